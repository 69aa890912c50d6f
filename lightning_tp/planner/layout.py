"""The model on the meta device under the strategy's plan, and what each rank stores of it.

Owns :class:`ParamShard` and :func:`param_shards` (each parameter's tensor-parallel and FSDP2 shard
sizes), the FSDP2 units they form, the LoRA adapters (:class:`Adapter`, :func:`adapters`) and the
strategy's shape check. Nothing is allocated: the model is built on the meta device and the plan is
resolved against it with :func:`lightning_tp.parallel.plans.resolve_plan`; which dimension a style
shards is :func:`lightning_tp.parallel.plans.tp_shard_dim`, the rule ``describe_plan`` uses too,
and which side of a projection an adapter follows is
:func:`lightning_tp.parallel.lora.lora_style`, the rule training uses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from lightning_tp.errors import PlanError
from lightning_tp.models.config import LlamaConfig
from lightning_tp.parallel.heads import head_layout, rank_heads, shown_style
from lightning_tp.parallel.plans import tp_shard_dim
from lightning_tp.planner.checkpoint import checkpoint_model
from lightning_tp.planner.errors import PlannerError
from lightning_tp.planner.inputs import Lora, PlanInputs

__all__ = ["Adapter", "BusiestRank", "ParamShard", "adapters", "busiest_rank", "check_shapes",
           "meta_model", "num_params", "param_shards", "plan_source", "tp_choices", "units"]

ROOT_UNIT = "<root>"
"""The FSDP2 unit of the parameters outside the decoder blocks (embeddings, final norm, lm_head)."""


def _frozen(value: Any) -> Any:
    """``value`` with every dict and list turned into a tuple, so that it can be hashed."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class _PlanKey:
    """What the meta model and the plan depend on, as an ``lru_cache`` key.

    :class:`LlamaConfig` is a frozen dataclass but not hashable (its ``rope_scaling`` is a dict), so
    the key hashes the config's fields with dicts frozen into tuples and compares configs by value.
    """

    config: LlamaConfig
    sequence_parallel: bool
    loss_parallel: bool
    checkpoint: Optional[str] = None

    def __hash__(self) -> int:
        fields = tuple(_frozen(getattr(self.config, f.name))
                       for f in dataclasses.fields(self.config))
        return hash((fields, self.sequence_parallel, self.loss_parallel, self.checkpoint))

    @classmethod
    def of(cls, inputs: PlanInputs) -> _PlanKey:
        return cls(inputs.config, inputs.sequence_parallel, inputs.loss_parallel,
                   inputs.checkpoint)


@functools.lru_cache(maxsize=32)
def _meta_model(key: _PlanKey) -> tuple[Any, Any]:
    import torch

    from lightning_tp.models.llama import Llama
    from lightning_tp.parallel.plans import resolve_plan

    if key.checkpoint is not None:  # the checkpoint's transformers model, its family's plan
        model = checkpoint_model(key.checkpoint).model
    else:
        with torch.device("meta"):
            model = Llama(key.config)
    with warnings.catch_warnings():  # a derived plan's warning: the report names its extras
        warnings.simplefilter("ignore")
        return model, resolve_plan(model, "auto", sequence_parallel=key.sequence_parallel,
                                   loss_parallel=key.loss_parallel)


def meta_model(inputs: PlanInputs) -> tuple[Any, Any]:
    """The model on the meta device (no memory) and the strategy's plan resolved against it."""
    return _meta_model(_PlanKey.of(inputs))


def plan_source(inputs: PlanInputs) -> str:
    """Which plan the model gets: its family's, or one derived from its ``base_model_tp_plan``."""
    if inputs.checkpoint is None:
        return "family 'llama' (the native Llama of the model preset)"
    return checkpoint_model(inputs.checkpoint).family


def num_params(inputs: PlanInputs) -> int:
    """Parameters of the planned model: counted from a checkpoint's model, else the config's."""
    if inputs.checkpoint is None:
        return inputs.config.num_params
    return checkpoint_model(inputs.checkpoint).num_params


def check_shapes(inputs: PlanInputs) -> None:
    """The strategy's own shape rules for this model at this tensor-parallel size."""
    from lightning_tp.parallel.shapes import check_model_shapes

    model, resolved = meta_model(inputs)
    check_model_shapes(model, resolved, inputs.tp)


def tp_choices(inputs: PlanInputs) -> list[tuple[int, int]]:
    """``(tp, dp = world / tp)`` for every tp the search may pick on these devices: dividing the
    node and the world, passing the strategy's shape rules, dividing the sequence under SP; dp > 1
    only with FSDP."""
    from lightning_tp.parallel.shapes import shape_problems  # the strategy's own rules

    out = []
    for tp in range(1, inputs.devices_per_node + 1):
        if inputs.devices_per_node % tp or inputs.world % tp:
            continue
        if shape_problems(inputs.config, tp) or (inputs.sequence_parallel and inputs.seq_len % tp):
            continue
        dp = inputs.world // tp
        if dp == 1 or inputs.fsdp:
            out.append((tp, dp))
    return out


def chunk(n: int, parts: int, index: int) -> int:
    """Size of ``torch.chunk``'s piece ``index`` of ``n`` split into ``parts`` (what a DTensor
    ``Shard`` keeps)."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


@dataclass(frozen=True)
class BusiestRank:
    """What the TP rank with the most work computes and keeps, per layer and in the vocabulary
    tables: the figures memory and compute use (the slowest rank sets the step's pace)."""

    q_heads: int
    """Query heads on the rank with the most (``ceil(nh / tp)``: whole heads, as even as
    possible, :func:`lightning_tp.parallel.heads.head_range`)."""
    kv_heads: int
    """KV heads that rank computes: ``nkv / tp`` split; one when tp is a multiple of them and
    divides the query heads; else one copy per local query head."""
    vocab_rows: int
    """Embedding and lm_head rows on TP rank 0, ``ceil(V / tp)`` (``torch.chunk``, as DTensor's
    uneven ``Shard(0)``)."""


def busiest_rank(config: LlamaConfig, tp: int) -> BusiestRank:
    """The busiest TP rank's heads and vocabulary rows under the Llama plan at ``tp``."""
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    layout = head_layout(nh, nkv, tp)
    if not layout.kv_replicated:
        q, kv = nh // tp, nkv // tp
    else:  # rank 0 holds one of the extra heads, if any; the styles' own selection rule
        query, key_value = rank_heads(nh, nkv, tp, 0)
        q, kv = len(query), len(key_value)
    return BusiestRank(q, kv, chunk(config.vocab_size, tp, 0))


@dataclass(frozen=True)
class ParamShard:
    """One parameter: where the plan puts it and what one rank stores."""

    name: str
    module: str
    style: str
    unit: str
    """The FSDP2 unit (decoder block path, or '<root>' for embeddings, final norm and lm_head)."""
    shape: tuple[int, ...]
    tp_dim: Optional[int]
    """Dimension the TP style shards (Colwise: 0 of a Linear weight; Rowwise: 1; Rowwise
    embedding: 0)."""
    tp_shape: tuple[int, ...]
    """Shape on tensor-parallel rank 0 (the plan's even split)."""
    padded_shard: int
    """Elements one rank stores: FSDP2's ceil(tp_shape[0] / dp) rows, padded (identical on every
    rank); a frozen LoRA base, which FSDP2 leaves alone, its whole ``tp_shape``."""
    trainable: bool = True
    """False for the frozen base under LoRA: TP-sharded only, no gradient, no optimizer state."""

    def local_shape(self, tp: int, dp: int, tp_rank: int, dp_rank: int,
                    fsdp: bool = True) -> tuple[int, ...]:
        """Unpadded local tensor shape on one rank, as ``param.to_local()`` shows it."""
        shape = list(self.shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] = chunk(shape[self.tp_dim], tp, tp_rank)
        if fsdp and self.trainable:
            shape[0] = chunk(shape[0], dp, dp_rank)
        return tuple(shape)


_Row = tuple[str, str, str, str, tuple[int, ...], Optional[int]]


@functools.lru_cache(maxsize=32)
def _param_layout(key: _PlanKey) -> tuple[_Row, ...]:
    """(name, module, style, FSDP unit, shape, TP dim) per parameter; it depends on the model and
    the plan, not on the sizes."""
    model, resolved = _meta_model(key)
    blocks = sorted(resolved.blocks, key=len, reverse=True)
    rows = []
    for name, param in model.named_parameters():  # a tied weight appears once, under its 1st owner
        owner = name.rpartition(".")[0]
        style = resolved.styles.get(owner)
        unit = next((b for b in blocks if name.startswith(b + ".")), ROOT_UNIT)
        rows.append((name, owner, type(style).__name__ if style else "-", unit, tuple(param.shape),
                     tp_shard_dim(style, model.get_submodule(owner), param.ndim,
                                  name=name.rpartition(".")[2])))
    return tuple(rows)


def _base_shards(inputs: PlanInputs) -> list[ParamShard]:
    """The model's own parameters under the plan; frozen (TP shards only) under LoRA."""
    frozen = inputs.lora is not None
    dp = inputs.dp if inputs.fsdp and not frozen else 1
    return list(_base_layout(_PlanKey.of(inputs), inputs.tp, dp, frozen))


@functools.lru_cache(maxsize=64)
def _base_layout(key: _PlanKey, tp: int, dp: int, frozen: bool) -> tuple[ParamShard, ...]:
    layout = head_layout(key.config.num_attention_heads, key.config.num_key_value_heads, tp)
    out = []
    for name, owner, style, unit, shape, dim in _param_layout(key):
        style, replicated = shown_style(style, layout)  # reported as what it does at this tp
        if replicated:
            dim = None  # heads tp cannot split evenly: replicated (lightning_tp.parallel.heads)
        tp_shape = list(shape)
        if dim is not None:
            tp_shape[dim] = chunk(tp_shape[dim], tp, 0)
        padded = -(-tp_shape[0] // dp) * math.prod(tp_shape[1:])
        out.append(ParamShard(name, owner, style, unit, shape, dim, tuple(tp_shape), padded,
                              trainable=not frozen))
    return tuple(out)


def param_shards(inputs: PlanInputs) -> list[ParamShard]:
    """Every parameter of the model under the strategy's plan, with its TP and FSDP2 shard sizes;
    under LoRA the frozen base, then every adapter's ``lora_A`` and ``lora_B``."""
    return _base_shards(inputs) + [p for a in adapters(inputs) for p in (a.a, a.b)]


@dataclass(frozen=True)
class Adapter:
    """One adapted projection: PEFT's ``lora_A`` (``r × in``) and ``lora_B`` (``out × r``),
    sharded to follow the base (:mod:`lightning_tp.parallel.lora`): a column-parallel base keeps
    ``A`` whole and splits ``B`` like itself; a row-parallel base splits ``A`` like itself and
    keeps ``B`` whole."""

    module: str
    unit: str
    colwise: bool
    """Column-parallel base (q/k/v, gate/up) or row-parallel (o_proj, down_proj)."""
    attention: bool
    """In the attention block (its parent's name has ``attn``), else in the MLP."""
    replicated: bool
    """The base is kept whole with each rank's heads selected (tp does not split its heads); the
    adapter factor that follows it is selected too."""
    a: ParamShard
    b: ParamShard
    in_local: int
    """Input features the busiest TP rank multiplies: the whole input of a column-parallel
    projection, the rank's columns (or selected heads) of a row-parallel one."""
    out_local: int
    """Output features the busiest TP rank computes: its rows (or selected heads) of a
    column-parallel projection, the whole output (a partial sum) of a row-parallel one."""

    @property
    def replicated_factor(self) -> ParamShard:
        """The factor every TP rank keeps whole, whose gradient is a partial sum over the TP ranks
        (``A`` of a column-parallel base, ``B`` of a row-parallel one)."""
        return self.a if self.colwise else self.b

    @property
    def selected_factor(self) -> Optional[ParamShard]:
        """The factor that follows a replicated base: whole on every rank, the rank's heads
        selected (an all-reduce of its gradient in every backward)."""
        return (self.b if self.colwise else self.a) if self.replicated else None


@functools.lru_cache(maxsize=32)
def _adapted(key: _PlanKey, targets: tuple[str, ...]) -> tuple[tuple[str, bool], ...]:
    """``(module, column-parallel)`` of every module PEFT's ``target_modules`` adapts, checked as
    training checks it (:func:`lightning_tp.parallel.lora.lora_style`)."""
    from types import SimpleNamespace

    from torch import nn

    from lightning_tp.parallel.lora import LoraColwise, lora_style

    model, resolved = _meta_model(key)
    blocks = tuple(resolved.blocks)
    matched = [(path, m) for path, m in model.named_modules()
               if any(path == t or path.endswith("." + t) for t in targets)]
    key_name = f"peft.target_modules={list(targets)}"
    if not matched:
        names = sorted({path.rpartition(".")[2] for path, m in model.named_modules()
                        if isinstance(m, nn.Linear) and path.startswith(tuple(b + "." for b in
                                                                                blocks))})
        raise PlannerError(f"{key_name} matches no module of the model. Fix: name its"
                           " decoder-layer projections, e.g."
                           f" peft.target_modules=[{','.join(names)}].")
    out = []
    for path, module in matched:
        where = f"{key_name} adapts {path!r} ({type(module).__name__})"
        if not isinstance(module, nn.Linear):
            raise PlannerError(f"{where}: LoRA adapts nn.Linear projections only. Fix: target the"
                               " attention and MLP projections by their last name (q_proj, ...).")
        if not path.startswith(tuple(b + "." for b in blocks)):
            raise PlannerError(f"{where}, outside the decoder layers: adapters follow the"
                               " decoder layers' projections only (the strategy refuses"
                               " embeddings and lm_head). Fix: leave it out of"
                               " peft.target_modules.")
        base = resolved.styles.get(path)
        if base is None:
            raise PlannerError(f"{where}: the plan does not shard that module, so an adapter has"
                               " no base layout to follow. Fix: leave it out of"
                               " peft.target_modules.")
        try:
            style = lora_style(path, SimpleNamespace(base_layer=module), base)
        except PlanError as e:
            raise PlannerError(f"{where}: {e}") from None
        out.append((path, isinstance(style, LoraColwise)))
    return tuple(out)


def adapters(inputs: PlanInputs) -> list[Adapter]:
    """Every adapted projection under ``inputs.lora`` (none without it), in the model's order.
    :class:`PlannerError` for targets that match nothing or that training would refuse, and for a
    rank above a projection's dimensions."""
    if inputs.lora is None:
        return []
    return list(_adapter_layout(_PlanKey.of(inputs), inputs.lora, inputs.tp,
                                inputs.dp if inputs.fsdp else 1))


@functools.lru_cache(maxsize=64)
def _adapter_layout(key: _PlanKey, lora: Lora, t: int, dp: int) -> tuple[Adapter, ...]:
    weights = {p.module: p for p in _base_layout(key, t, 1, True) if p.name.endswith(".weight")}
    cfg, r = key.config, lora.rank
    rank = busiest_rank(cfg, t)
    d = cfg.resolved_head_dim
    out = []
    for path, colwise in _adapted(key, lora.target_modules):
        w = weights[path]
        n_out, n_in = w.shape
        if r > min(n_out, n_in):
            raise PlannerError(f"peft.rank={r} is larger than the smaller side of {path}"
                               f" ({n_out} x {n_in}), so its update B·A cannot have rank {r}."
                               f" Fix: peft.rank <= {min(n_out, n_in)}.")
        replicated = t > 1 and w.tp_dim is None
        a, b = _factors(w, r, dp, colwise, replicated)
        if colwise:
            in_local = n_in
            out_local = _selected(n_out, cfg, rank, d) if replicated else w.tp_shape[0]
        else:
            in_local = _selected(n_in, cfg, rank, d) if replicated else w.tp_shape[1]
            out_local = n_out
        parent = path.rpartition(".")[0].rpartition(".")[2]
        out.append(Adapter(path, w.unit, colwise, "attn" in parent, replicated, a, b, in_local,
                           out_local))
    return tuple(out)


def _factors(w: ParamShard, r: int, dp: int, colwise: bool,
             replicated: bool) -> tuple[ParamShard, ParamShard]:
    """``lora_A`` (``r × in``) and ``lora_B`` (``out × r``) next to the base weight ``w``: each
    factor split like the base on the side it shares with it, else whole; FSDP2-sharded over
    ``dp``. A replicated base's following factor is kept whole and selected like it."""
    def shard(factor: str, shape: tuple[int, int], dim: Optional[int],
              tp_shape: tuple[int, int], follows: bool) -> ParamShard:
        return ParamShard(f"{w.module}.lora_{factor}.default.weight", f"{w.module}.lora_{factor}",
                          w.style if follows else "replicated", w.unit, shape, dim, tp_shape,
                          -(-tp_shape[0] // dp) * tp_shape[1])

    n_out, n_in = w.shape
    a_dim = 1 if w.tp_dim == 1 else None  # a row-parallel base's input columns
    b_dim = 0 if w.tp_dim == 0 else None  # a column-parallel base's output rows
    return (shard("A", (r, n_in), a_dim, (r, w.tp_shape[1]),
                  a_dim is not None or (replicated and not colwise)),
            shard("B", (n_out, r), b_dim, (w.tp_shape[0], r),
                  b_dim is not None or (replicated and colwise)))


def _selected(features: int, cfg: LlamaConfig, rank: BusiestRank, d: int) -> int:
    """Features of a replicated head projection the busiest rank selects: its query heads (q/o)
    or its KV copies (k/v)."""
    if features == cfg.num_attention_heads * d:
        return rank.q_heads * d
    if features == cfg.num_key_value_heads * d:
        return rank.kv_heads * d
    return features  # a fused projection (rows of several kinds): counted whole


def units(shards: list[ParamShard]) -> dict[str, int]:
    """TP-local elements each FSDP2 unit all-gathers (padded), in forward order: the trainable
    parameters (a frozen LoRA base is left out of FSDP2)."""
    out: dict[str, int] = {ROOT_UNIT: 0}
    for p in shards:
        if p.trainable:
            out[p.unit] = out.get(p.unit, 0) + p.padded_shard
    return out
