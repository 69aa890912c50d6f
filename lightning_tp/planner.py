"""Dry-run planner: memory, communication and step time of a (tp, dp, activation checkpointing) layout, on a CPU.

``lightning-tp plan model=llama3_70b strategy.tensor_parallel_size=8 strategy.data_parallel_size=32 ...``

Nothing is allocated: the model is built on the meta device, the strategy's own plan is resolved against it
(:func:`lightning_tp.parallel.plans.resolve_plan`) and checked with the strategy's shape rules
(:func:`lightning_tp.parallel.apply.check_model_shapes`); per-rank shapes follow from the placements the
plan and FSDP2 produce (tensor parallel ``Shard(d)`` then FSDP2 ``Shard(0)`` padded to equal chunks).
``tests/unit/planner/test_planner.py`` checks those shapes against a model really sharded under a fake process group.
The formulas, their sources and how the estimates compare with published runs are in ``docs/planner.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lightning_tp.errors import LightningTPError
from lightning_tp.hardware import Accelerator, Link, get_accelerator, get_link, load_hardware
from lightning_tp.models.config import LlamaConfig, get_config
from lightning_tp.recipes.config import ModelConfig, PretrainDataConfig, StrategyConfig, TrainerConfig
from lightning_tp.training.callbacks import mfu

__all__ = [
    "AC_MODES",
    "PRECISIONS",
    "Candidate",
    "Collective",
    "PlanConfig",
    "PlanInputs",
    "PlanReport",
    "PlannerError",
    "analyze",
    "collectives",
    "compose_inputs",
    "layer_activation_bytes",
    "main",
    "param_shards",
    "recommend",
]

CONF_DIR = Path(__file__).resolve().parent / "conf"  # packaged configs (lightning_tp.recipes.CONF_DIR)
AC_MODES = ("none", "selective", "full")
# Bytes per element: (stored parameter, gathered/compute copy, gradient shard, AdamW state = 2 moments).
# bf16-mixed is the strategy's FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 master
# shards, bf16 all-gathered units, fp32 reduce-scatter and gradients.
PRECISIONS = {"bf16-mixed": (4, 2, 4, 8), "bf16-true": (2, 2, 2, 4), "16-true": (2, 2, 2, 4),
              "32-true": (4, 4, 4, 8)}


class PlannerError(LightningTPError):
    """A planner input is unknown or inconsistent (the message names the key, the value and the fix)."""


@dataclass
class PlanConfig:
    """Hydra schema of ``conf/plan.yaml``: the recipe groups plus what only the planner needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """The strategy's arguments (the recipes' schema, activation checkpointing, float8 and async TP included)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    accelerator: str = "h100"
    """Name in lightning_tp.hardware.ACCELERATORS (h100, h200, a100, or one you add)."""
    link: str = "auto"
    """Inter-node link for collectives whose group spans nodes; auto = the accelerator's."""
    intra_node_link: str = "auto"
    """Link inside a node; auto = the accelerator's (NVLink)."""
    devices_per_node: Optional[int] = None
    """None = ``trainer.devices`` if it is an int, else the accelerator's node size."""
    efficiency: Optional[float] = None
    """Fraction of peak FLOP/s the kernels sustain (communication excluded); None = the accelerator's default
    (H100/H200 0.4, A100 0.55); see docs/planner.md."""
    memory_headroom: float = 0.1
    """Fraction of device memory kept free (allocator fragmentation, CUDA context, NCCL buffers)."""
    hardware_file: Optional[str] = None
    """JSON/YAML file of extra accelerators/links (see lightning_tp.hardware)."""
    output: str = "text"
    """text | json."""
    top: int = 5
    """How many ranked candidates the recommendation lists."""


@dataclass(frozen=True)
class PlanInputs:
    """A resolved layout to evaluate: every figure the formulas need, validated."""

    config: LlamaConfig
    tp: int
    dp: int
    seq_len: int
    batch_size: int
    """Sequences per micro-batch per data-parallel replica."""
    accelerator: Accelerator
    intra_link: Link
    inter_link: Link
    accumulate: int = 1
    precision: str = "bf16-mixed"
    sequence_parallel: bool = True
    loss_parallel: bool = True
    fsdp: bool = True
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"
    float8: bool = False
    """Decoder-block linears in float8 (torchao, as the strategy's ``float8=True``): their matmuls at the fp8 peak."""
    async_tp: bool = False
    """Decoder-layer TP collectives overlapped with the matmuls (the strategy's ``async_tp=True``)."""
    devices_per_node: int = 8
    efficiency: float = 0.4
    memory_headroom: float = 0.1
    model_name: str = "custom"

    def __post_init__(self) -> None:
        problems = []
        for key, value in (("strategy.tensor_parallel_size", self.tp), ("strategy.data_parallel_size", self.dp),
                           ("data.seq_len", self.seq_len), ("data.batch_size", self.batch_size),
                           ("trainer.accumulate_grad_batches", self.accumulate),
                           ("devices_per_node", self.devices_per_node)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{key}={value!r} must be a positive int")
        if self.precision not in PRECISIONS:
            problems.append(f"trainer.precision={self.precision!r} is not one the strategy supports; use one of"
                            f" {', '.join(PRECISIONS)}")
        if self.activation_checkpointing not in AC_MODES:
            problems.append(f"strategy.activation_checkpointing={self.activation_checkpointing!r}: use one of"
                            f" {', '.join(AC_MODES)}")
        if self.float8 and "fp8" not in self.accelerator.peak_flops:
            problems.append(f"strategy.float8=true but accelerator={self.accelerator.name!r} has no 'fp8' peak; use"
                            " an accelerator with float8 tensor cores (h100, h200) or strategy.float8=false")
        if self.async_tp and self.tp == 1:
            problems.append("strategy.async_tp=true with tensor_parallel_size=1 has no TP collectives to overlap;"
                            " set async_tp=false or tensor_parallel_size>1")
        if not 0 < self.efficiency <= 1:
            problems.append(f"efficiency={self.efficiency!r} must be in (0, 1]")
        if not 0 <= self.memory_headroom < 1:
            problems.append(f"memory_headroom={self.memory_headroom!r} must be in [0, 1)")
        if not self.fsdp and self.dp != 1:
            problems.append(f"strategy.fsdp=false needs strategy.data_parallel_size=1, got {self.dp}; set"
                            " strategy.fsdp=true or data_parallel_size=1")
        if not problems and self.sequence_parallel and self.seq_len % self.tp:
            problems.append(f"data.seq_len={self.seq_len} is not divisible by tensor_parallel_size={self.tp} under"
                            f" sequence parallelism: use a multiple of {self.tp} or strategy.sequence_parallel=false")
        if problems:
            raise PlannerError("Invalid plan inputs: " + "; ".join(problems) + ".")

    @property
    def world(self) -> int:
        return self.tp * self.dp

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch per data-parallel replica (``b·s``)."""
        return self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> PlanInputs:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------
# The model on the meta device and its shards
# ----------------------------------------------------------------------------------------------------------

_MODELS: dict[str, tuple[Any, Any]] = {}


def _meta_model(config: LlamaConfig, sequence_parallel: bool, loss_parallel: bool) -> tuple[Any, Any]:
    """The model on the meta device (no memory) and the strategy's plan resolved against it; cached."""
    import torch

    from lightning_tp.models.llama import Llama
    from lightning_tp.parallel.plans import resolve_plan

    key = repr((config, sequence_parallel, loss_parallel))
    if key not in _MODELS:
        with torch.device("meta"):
            model = Llama(config)
        _MODELS[key] = (model, resolve_plan(model, "auto", sequence_parallel=sequence_parallel,
                                            loss_parallel=loss_parallel))
    return _MODELS[key]


def _chunk(n: int, parts: int, index: int) -> int:
    """Size of ``torch.chunk``'s piece ``index`` of ``n`` split into ``parts`` (what DTensor ``Shard`` keeps)."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


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
    """Dimension the TP style shards (Colwise: 0 of a Linear weight; Rowwise: 1; Rowwise embedding: 0)."""
    tp_shape: tuple[int, ...]
    """Shape on tensor-parallel rank 0 (the plan's even split)."""
    padded_shard: int
    """Elements FSDP2 stores per rank: ceil(tp_shape[0] / dp) rows, padded (identical on every rank)."""

    def local_shape(self, tp: int, dp: int, tp_rank: int, dp_rank: int, fsdp: bool = True) -> tuple[int, ...]:
        """Unpadded local tensor shape on one rank, as ``param.to_local()`` shows it."""
        shape = list(self.shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] = _chunk(shape[self.tp_dim], tp, tp_rank)
        if fsdp:
            shape[0] = _chunk(shape[0], dp, dp_rank)
        return tuple(shape)


def _tp_dim(style: Any, module: Any, param_ndim: int) -> Optional[int]:
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    embedding = isinstance(module, nn.Embedding)
    if isinstance(style, ColwiseParallel):
        return 0 if param_ndim == 1 else (1 if embedding else 0)
    if isinstance(style, RowwiseParallel):
        return None if param_ndim == 1 else (0 if embedding else 1)
    return None  # SequenceParallel / ReplicateParallel norms: replicated over TP


_LAYOUTS: dict[str, list[tuple[str, str, str, str, tuple[int, ...], Optional[int]]]] = {}


def _param_layout(inputs: PlanInputs) -> list[tuple[str, str, str, str, tuple[int, ...], Optional[int]]]:
    """(name, module, style, FSDP unit, shape, TP dim) per parameter; depends on the model and plan, not sizes."""
    key = repr((inputs.config, inputs.sequence_parallel, inputs.loss_parallel))
    if key not in _LAYOUTS:
        model, resolved = _meta_model(inputs.config, inputs.sequence_parallel, inputs.loss_parallel)
        blocks = sorted(resolved.blocks, key=len, reverse=True)
        rows = []
        for name, param in model.named_parameters():  # tied weights appear once, under their first owner
            owner = name.rpartition(".")[0]
            style = resolved.styles.get(owner)
            unit = next((b for b in blocks if name.startswith(b + ".")), "<root>")
            rows.append((name, owner, type(style).__name__ if style else "-", unit, tuple(param.shape),
                         _tp_dim(style, model.get_submodule(owner), param.ndim)))
        _LAYOUTS[key] = rows
    return _LAYOUTS[key]


def param_shards(inputs: PlanInputs) -> list[ParamShard]:
    """Every parameter of the model under the strategy's plan, with its TP and FSDP2 shard sizes."""
    dp = inputs.dp if inputs.fsdp else 1
    out = []
    for name, owner, style, unit, shape, dim in _param_layout(inputs):
        tp_shape = list(shape)
        if dim is not None:
            tp_shape[dim] = _chunk(tp_shape[dim], inputs.tp, 0)
        padded = -(-tp_shape[0] // dp) * math.prod(tp_shape[1:])
        out.append(ParamShard(name, owner, style, unit, shape, dim, tuple(tp_shape), padded))
    return out


def _units(shards: list[ParamShard]) -> dict[str, int]:
    """TP-local elements each FSDP2 unit all-gathers (padded), in forward order."""
    units: dict[str, int] = {"<root>": 0}
    for p in shards:
        units[p.unit] = units.get(p.unit, 0) + p.padded_shard
    return units


# ----------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------


def layer_activation_bytes(inputs: PlanInputs, mode: Optional[str] = None) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward, per micro-batch, on one rank, by tensor.

    Counted from what autograd saves in ``lightning_tp.models.llama`` (checked against
    ``torch.autograd.graph.saved_tensors_hooks`` in the tests). ``E = b·s`` tokens, ``a`` = activation bytes,
    ``t`` = tp, ``t_s`` = t under SP (norms and residuals sequence-sharded) else 1:

    * each RMSNorm: its input ``a·E·h/t_s`` and one fp32 rsqrt per token ``4·E/t_s`` (it normalises in fp32 but
      does not keep the fp32 copy);
    * each norm output as the colwise projections see it: ``a·E·h`` **whole** (all-gathered under SP);
    * attention: q, k, v and the attention output ``a·E·(2·nh + 2·nkv)·d/t``, log-sum-exp ``4·b·nh·s/t``;
    * MLP: gate, up, SiLU(gate), SiLU(gate)·up ``4·a·E·I/t``.

    ``selective`` keeps the block input, the colwise matmul outputs (q, k, v, gate, up), the attention output
    and log-sum-exp, and the reduce-scatter (all-reduce) outputs of o_proj and down_proj; it recomputes norms,
    RoPE, SiLU, products and all-gathers. ``full`` keeps only the block input.
    """
    cfg, t, a = inputs.config, inputs.tp, PRECISIONS[inputs.precision][1]
    ts = t if inputs.sequence_parallel else 1
    e, h, d, b, s = inputs.tokens, cfg.hidden_size, cfg.resolved_head_dim, inputs.batch_size, inputs.seq_len
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    mode = mode or inputs.activation_checkpointing
    block_input = a * e * h // ts
    if mode == "full":
        return {"block input": block_input}
    parts = {
        "q, k, v": a * e * (q + 2 * kv) // t,
        "attention output + lse": a * e * q // t + 4 * b * cfg.num_attention_heads * s // t,
    }
    if mode == "selective":
        parts.update({"block input": block_input, "o_proj, down_proj outputs (reduced)": 2 * a * e * h // ts,
                      "gate, up": 2 * a * e * inter // t})
        return parts
    parts.update({
        "2 RMSNorm (input, rsqrt)": 2 * (a * e * h // ts + 4 * e // ts),
        "2 gathered norm outputs (whole)": 2 * a * e * h,
        "MLP (gate, up, silu, product)": 4 * a * e * inter // t,
    })
    return parts


def _activations(inputs: PlanInputs) -> dict[str, int]:
    """Peak activation bytes per rank for one micro-batch, by part (see docs/planner.md)."""
    cfg, t, a = inputs.config, inputs.tp, PRECISIONS[inputs.precision][1]
    ts = t if inputs.sequence_parallel else 1
    e, h, layers = inputs.tokens, cfg.hidden_size, cfg.num_hidden_layers
    per_layer = sum(layer_activation_bytes(inputs).values())
    vocab_t = t if inputs.loss_parallel else 1
    out = {
        "decoder layers (saved)": layers * per_layer,
        # token ids for the embedding backward; final norm as in a layer; lm_head's whole (gathered) input
        "embedding, final norm, lm_head input": 8 * e + (4 + a) * e * h // ts + 4 * e // ts + a * e * h,
        # fp32 log-probabilities saved by cross entropy (vocab-sharded under loss parallel, whole otherwise)
        "logits (fp32 log-probs)": 4 * e * cfg.vocab_size // vocab_t,
    }
    # The largest transient: at the start of backward the loss gradient (fp32) and its input gradient (fp32)
    # sit beside the saved log-probs; under checkpointing, one layer's recomputed tensors during its backward.
    loss_transient = 8 * e * cfg.vocab_size // vocab_t
    recompute = 0
    if inputs.activation_checkpointing != "none":
        recompute = sum(layer_activation_bytes(inputs, "none").values())
    out["transient (max of loss backward, one layer's recompute)"] = max(loss_transient, recompute)
    return out


# ----------------------------------------------------------------------------------------------------------
# Memory, communication and time
# ----------------------------------------------------------------------------------------------------------


def _memory(inputs: PlanInputs, shards: list[ParamShard]) -> dict[str, int]:
    stored, compute, grad, optim = PRECISIONS[inputs.precision]
    local = sum(p.padded_shard for p in shards)
    units = _units(shards)
    largest = max(units.values())
    mem = {"parameters": stored * local, "gradients": grad * local, "optimizer (AdamW)": optim * local}
    if inputs.fsdp:
        # Two gathered units at a time (current + prefetched), the current unit's unsharded gradient, and
        # its reduce-scatter input in the reduce dtype.
        transient = (2 * compute + compute + grad) * largest * inputs.dp
        if not inputs.reshard_after_forward:  # every unit stays gathered from its forward to its backward
            transient += compute * sum(units.values()) * inputs.dp
        mem["FSDP2 gathered units (transient)"] = transient
        if inputs.accumulate > 1:  # unsharded gradients accumulate in the reduce dtype until the last micro-batch
            mem["accumulated unsharded gradients"] = grad * sum(units.values()) * inputs.dp
    mem.update(_activations(inputs))
    return mem


@dataclass(frozen=True)
class Collective:
    """Calls of one collective type per optimizer step, on one rank."""

    group: str
    """'tp' or 'dp'."""
    kind: str
    """all_gather | reduce_scatter | all_reduce."""
    where: str
    calls: int
    tensor_bytes: int
    """Bytes of the whole (gathered / reduced) tensor per call (the mean over FSDP2 units)."""
    link: str
    bytes_per_rank: float
    """Bytes each rank sends per step over a ring: (n−1)/n·S per all-gather or reduce-scatter, twice that per
    all-reduce."""
    seconds: float


def _ring(kind: str, n: int, size: float) -> float:
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * size


def _group_link(inputs: PlanInputs, group: str) -> Link:
    span = inputs.tp if group == "tp" else inputs.world
    return inputs.intra_link if span <= inputs.devices_per_node else inputs.inter_link


def collectives(inputs: PlanInputs, shards: Optional[list[ParamShard]] = None) -> list[Collective]:
    """Collectives per optimizer step per rank: TP (per layer and outside the layers) and FSDP2."""
    cfg, t, m, layers = inputs.config, inputs.tp, inputs.accumulate, inputs.config.num_hidden_layers
    a = PRECISIONS[inputs.precision][1]
    act = inputs.tokens * cfg.hidden_size * a  # one whole (b, s, h) activation
    # (group, kind, where, calls per step, bytes of all those calls' whole tensors together)
    rows: list[tuple[str, str, str, int, int]] = []
    if t > 1:
        ac = inputs.activation_checkpointing
        if inputs.sequence_parallel:
            # Forward: all-gather before attention and MLP, reduce-scatter after o_proj and down_proj; backward
            # the reverse; recomputation repeats forward collectives (selective: only the all-gathers).
            ag = 4 * layers + (2 * layers if ac != "none" else 0)
            rs = 4 * layers + (2 * layers if ac == "full" else 0)
            tp_rows = [("all_gather", "decoder layers: 2 fwd + 2 bwd (+ recompute) per layer", ag, act),
                       ("reduce_scatter", "decoder layers: 2 fwd + 2 bwd (+ recompute) per layer", rs, act),
                       ("all_reduce", "embedding output (fwd)", 1, act),
                       ("all_gather", "sequence split before layer 0 (bwd)", 1, act),
                       ("all_gather", "lm_head input (fwd)", 1, act),
                       ("reduce_scatter", "lm_head input gradient (bwd)", 1, act)]
        else:
            ar = 4 * layers + (2 * layers if ac == "full" else 0)
            tp_rows = [("all_reduce", "decoder layers: 2 fwd + 2 bwd (+ recompute) per layer", ar, act),
                       ("all_reduce", "embedding output (fwd)", 1, act),
                       ("all_reduce", "lm_head input gradient (bwd)", 1, act)]
        if inputs.loss_parallel:
            tp_rows.append(("all_reduce", "vocab-parallel cross entropy: max, sum-exp, target", 3, 4 * inputs.tokens))
        else:
            tp_rows.append(("all_gather", "logits gathered for the loss (fwd)", 1, a * inputs.tokens * cfg.vocab_size))
        rows += [("tp", kind, where, calls * m, calls * m * size) for kind, where, calls, size in tp_rows]
    if inputs.fsdp and inputs.dp > 1:
        _, compute, grad, _ = PRECISIONS[inputs.precision]
        units = _units(shards if shards is not None else param_shards(inputs))
        gathered = {u: n * inputs.dp for u, n in units.items()}  # whole TP-local unit, padded
        total = sum(gathered.values())
        rows.append(("dp", "all_gather", "parameters, forward (every micro-batch)", m * len(units),
                     m * compute * total))
        if inputs.reshard_after_forward:  # the last block is kept gathered for the start of backward
            last = [u for u in units if u != "<root>"][-1:]
            rows.append(("dp", "all_gather", "parameters, backward (resharded after forward)",
                         m * (len(units) - len(last)), m * compute * (total - sum(gathered[u] for u in last))))
        rows.append(("dp", "reduce_scatter", "gradients (last micro-batch only)", len(units), grad * total))
    out = []
    for group, kind, where, calls, size in rows:
        link = _group_link(inputs, group)
        sent = _ring(kind, t if group == "tp" else inputs.dp, size)
        seconds = sent / link.effective_bandwidth + calls * link.latency
        out.append(Collective(group, kind, where, calls, size // calls, link.name, sent, seconds))
    return out


@dataclass(frozen=True)
class Estimate:
    """Step time split and the throughput it implies (see docs/planner.md for the overlap assumptions)."""

    model_flops_per_token: float
    hardware_flops_per_token: float
    compute_s: float
    tp_comm_s: float
    fsdp_comm_s: float
    fsdp_exposed_s: float
    optimizer_s: float
    step_s: float
    tokens_per_step: int
    tokens_per_s_per_device: float
    mfu: float


def _estimate(inputs: PlanInputs, shards: list[ParamShard], comms: list[Collective]) -> Estimate:
    cfg, s, layers = inputs.config, inputs.seq_len, inputs.config.num_hidden_layers
    model_fpt = cfg.flops_per_token(s)
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    block_linear = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * h * cfg.intermediate_size
    attention_fwd = 4 * layers * cfg.num_attention_heads * d * s
    linear_fpt = 6 * layers * block_linear  # the decoder blocks' matmuls (float8 under strategy.float8)
    other_fpt = model_fpt - linear_fpt  # attention and lm_head (bf16 either way)
    if inputs.activation_checkpointing == "full":  # one more forward of every decoder layer
        linear_fpt += 2 * layers * block_linear
        other_fpt += attention_fwd
    hw_fpt = linear_fpt + other_fpt
    peak = inputs.accelerator.peak(inputs.precision)
    linear_peak = inputs.accelerator.peak_flops["fp8"] if inputs.float8 else peak
    compute = (inputs.accumulate * inputs.tokens / inputs.tp
               * (linear_fpt / linear_peak + other_fpt / peak) / inputs.efficiency)
    tp_comm = sum(c.seconds for c in comms if c.group == "tp")
    if inputs.async_tp:  # the per-layer collectives hide under the matmuls they feed, as far as those last
        layer_comm = sum(c.seconds for c in comms if c.group == "tp" and c.where.startswith("decoder layers"))
        tp_comm += max(0.0, layer_comm - compute) - layer_comm
    dp_rows = [c for c in comms if c.group == "dp"]
    fsdp = sum(c.seconds for c in dp_rows)
    exposed = 0.0
    if dp_rows:
        # FSDP2 prefetches the next unit while one computes: only the first all-gather (the root unit: embeddings
        # and lm_head) and the last reduce-scatter (the root again) wait, plus whatever does not fit under
        # compute and TP communication.
        _, compute_bytes, grad_bytes, _ = PRECISIONS[inputs.precision]
        root = _units(shards)["<root>"] * inputs.dp
        link = _group_link(inputs, "dp")
        first_last = (_ring("all_gather", inputs.dp, compute_bytes * root) + _ring("reduce_scatter", inputs.dp,
                      grad_bytes * root)) / link.effective_bandwidth + 2 * link.latency
        # TP collectives hide FSDP2 traffic only when the two run over different links (TP on NVLink, FSDP on
        # InfiniBand); on one link they queue behind each other.
        shared = _group_link(inputs, "tp") is link and tp_comm > 0
        exposed = max(0.0, fsdp - compute - (0.0 if shared else tp_comm)) + first_last
    stored = PRECISIONS[inputs.precision][0]
    # AdamW (foreach) reads parameter, gradient and two moments and writes three of them: memory-bound.
    optimizer = 7 * stored * sum(p.padded_shard for p in shards) / inputs.accelerator.hbm_bandwidth
    step = compute + tp_comm + exposed + optimizer
    tokens = inputs.tokens * inputs.dp * inputs.accumulate
    return Estimate(model_fpt, hw_fpt, compute, tp_comm, fsdp, exposed, optimizer, step, tokens,
                    tokens / step / inputs.world, mfu(tokens / step, model_fpt, inputs.world, peak))


# ----------------------------------------------------------------------------------------------------------
# Reports and recommendation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PlanReport:
    inputs: dict[str, Any]
    plan: list[dict[str, Any]]
    """Applied plan rows (embeddings, block 0, final norm, lm_head): module, style, shapes."""
    ranks: list[dict[str, Any]]
    """Ranks grouped by identical per-rank figures."""
    memory: dict[str, int]
    activations_per_layer: dict[str, int]
    communication: list[dict[str, Any]]
    estimate: dict[str, Any]
    recommendation: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _check_shapes(inputs: PlanInputs) -> None:
    from lightning_tp.parallel.apply import check_model_shapes

    model, resolved = _meta_model(inputs.config, inputs.sequence_parallel, inputs.loss_parallel)
    check_model_shapes(model, resolved, inputs.tp)


def _fits(inputs: PlanInputs, total: int) -> bool:
    return total <= (1 - inputs.memory_headroom) * inputs.accelerator.memory_bytes


def analyze(inputs: PlanInputs, top: int = 5) -> PlanReport:
    """Everything the planner reports for one layout, plus the ranked alternatives."""
    _check_shapes(inputs)
    shards = param_shards(inputs)
    memory = _memory(inputs, shards)
    comms = collectives(inputs, shards)
    est = _estimate(inputs, shards, comms)
    total = sum(memory.values())
    # Ranks differ only through uneven FSDP2 chunks (storage is padded, so memory does not differ).
    dp_eff = inputs.dp if inputs.fsdp else 1
    groups: dict[int, list[int]] = {}
    shape_counts = Counter((p.shape, p.tp_dim) for p in shards)
    for dp_rank in range(dp_eff):
        n = 0
        for (shape, dim), count in shape_counts.items():
            sh = ParamShard("", "", "", "", shape, dim, shape, 0)
            n += count * math.prod(sh.local_shape(inputs.tp, dp_eff, 0, dp_rank, inputs.fsdp))
        groups.setdefault(n, []).append(dp_rank)
    ranks = []
    for n, dp_ranks in groups.items():
        members = [d * inputs.tp + t for d in dp_ranks for t in range(inputs.tp)]
        ranks.append({"ranks": _ranges(members), "local_parameters": n,
                      "stored_parameters_padded": sum(p.padded_shard for p in shards), "memory_total": total,
                      "fits": _fits(inputs, total)})
    blocks_shown = {"model.embed_tokens", "model.norm", "lm_head"}
    model, resolved = _meta_model(inputs.config, inputs.sequence_parallel, inputs.loss_parallel)
    by_module = {p.module: p for p in shards}
    rows = []
    order = {name: n for n, (name, _) in enumerate(model.named_modules())}
    for path in sorted(resolved.styles, key=order.__getitem__):
        if not (path in blocks_shown or path == "model.layers.0" or path.startswith("model.layers.0.")):
            continue
        style, p = resolved.styles[path], by_module.get(path)
        layouts = {k.replace("_layouts", ""): _short(v) for k, v in vars(style).items() if "layout" in k and v}
        rows.append({"module": path, "style": type(style).__name__, "layouts": layouts,
                     "shape": list(p.shape) if p else None, "tp_local": list(p.tp_shape) if p else None,
                     "rank0_local": list(p.local_shape(inputs.tp, dp_eff, 0, 0, inputs.fsdp)) if p else None})
    return PlanReport(
        inputs=_describe_inputs(inputs), plan=rows, ranks=ranks, memory=memory,
        activations_per_layer=layer_activation_bytes(inputs),
        communication=[dataclasses.asdict(c) for c in comms], estimate=dataclasses.asdict(est),
        recommendation=[dataclasses.asdict(c) for c in recommend(inputs, top=top)] if top else [],
    )


def _short(layout: Any) -> str:
    """``(Shard(dim=1),)`` → ``Shard(1)``; dicts of keyword layouts likewise."""
    if isinstance(layout, dict):
        return ",".join(f"{k}:{_short(v)}" for k, v in layout.items())
    if isinstance(layout, (tuple, list)):
        return ",".join(_short(v) for v in layout)
    return str(layout).replace("dim=", "")


def _ranges(ranks: list[int]) -> str:
    ranks, parts, start = sorted(ranks), [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def _describe_inputs(inputs: PlanInputs) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(inputs).items() if k not in ("config", "accelerator", "intra_link",
                                                                          "inter_link")}
    d.update(accelerator=inputs.accelerator.name, intra_link=inputs.intra_link.name,
             inter_link=inputs.inter_link.name, world=inputs.world, num_params=inputs.config.num_params,
             device_memory=inputs.accelerator.memory_bytes)
    return d


@dataclass(frozen=True)
class Candidate:
    tp: int
    dp: int
    activation_checkpointing: str
    memory: int
    fits: bool
    step_s: float
    tokens_per_s_per_device: float
    mfu: float


def _shape_ok(inputs: PlanInputs, tp: int) -> bool:
    from lightning_tp.parallel.apply import shape_problems  # the strategy's own rules

    return not shape_problems(inputs.config, tp) and not (inputs.sequence_parallel and inputs.seq_len % tp)


def recommend(inputs: PlanInputs, top: int = 5) -> list[Candidate]:
    """Every (tp, dp = world / tp, activation checkpointing) with tp dividing the node and the model's sharded
    dimensions, the micro-batch per replica kept; those that fit first, fastest first."""
    out = []
    for tp in range(1, inputs.devices_per_node + 1):
        if inputs.devices_per_node % tp or inputs.world % tp or not _shape_ok(inputs, tp):
            continue
        dp = inputs.world // tp
        if dp > 1 and not inputs.fsdp:
            continue
        for ac in AC_MODES:
            cand = inputs.replace(tp=tp, dp=dp, activation_checkpointing=ac, async_tp=inputs.async_tp and tp > 1)
            shards = param_shards(cand)
            total = sum(_memory(cand, shards).values())
            est = _estimate(cand, shards, collectives(cand, shards))
            out.append(Candidate(tp, dp, ac, total, _fits(cand, total), est.step_s, est.tokens_per_s_per_device,
                                 est.mfu))
    # Ties (communication-bound layouts where recomputation hides under FSDP2 traffic) go to less recomputation.
    out.sort(key=lambda c: (not c.fits, -round(c.tokens_per_s_per_device, 3),
                            AC_MODES.index(c.activation_checkpointing)))
    return out[:top]


# ----------------------------------------------------------------------------------------------------------
# Configuration (Hydra) and the command line
# ----------------------------------------------------------------------------------------------------------


def compose_inputs(overrides: list[str]) -> tuple[PlanInputs, Any]:
    """Compose ``conf/plan.yaml`` with Hydra ``key=value`` overrides and resolve it into :class:`PlanInputs`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="plan"):
            cfg = compose(config_name="plan", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        raise PlannerError(f"Cannot compose the planner config from {keys}: {e} Keys are those of"
                           " conf/plan.yaml (`lightning-tp plan --cfg` prints them); groups: model, strategy, trainer,"
                           " data.") from None
    return _resolve(cfg), cfg


def _resolve(cfg: Any) -> PlanInputs:
    if cfg.hardware_file:
        load_hardware(cfg.hardware_file)
    acc = get_accelerator(cfg.accelerator)
    inter = get_link(acc.inter_node_link if cfg.link == "auto" else cfg.link)
    intra = get_link(acc.intra_node_link if cfg.intra_node_link == "auto" else cfg.intra_node_link)
    devices = cfg.trainer.devices
    per_node = cfg.devices_per_node or (devices if isinstance(devices, int) else acc.devices_per_node)
    tp, dp = cfg.strategy.tensor_parallel_size, cfg.strategy.data_parallel_size
    for key, value in (("strategy.tensor_parallel_size", tp), ("strategy.data_parallel_size", dp)):
        if value != "auto" and not isinstance(value, int):
            raise PlannerError(f"{key}={value!r} must be 'auto' or a positive int.")
    # As the strategy resolves them: tp = devices per node, dp = number of nodes.
    tp = per_node if tp == "auto" else tp
    dp = cfg.trainer.num_nodes * per_node // tp if dp == "auto" else dp
    overrides = {k: v for k, v in cfg.model.items() if k != "name" and v is not None}
    try:
        config = get_config(cfg.model.name, **overrides)
    except KeyError as e:
        raise PlannerError(f"model={cfg.model.name!r}: {e.args[0]}") from None
    return PlanInputs(
        config=config, tp=tp, dp=dp, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, accelerator=acc,
        intra_link=intra, inter_link=inter, accumulate=cfg.trainer.accumulate_grad_batches,
        precision=cfg.trainer.precision, sequence_parallel=cfg.strategy.sequence_parallel,
        loss_parallel=cfg.strategy.loss_parallel, fsdp=cfg.strategy.fsdp,
        reshard_after_forward=cfg.strategy.reshard_after_forward,
        activation_checkpointing=cfg.strategy.activation_checkpointing, float8=cfg.strategy.float8,
        async_tp=cfg.strategy.async_tp, devices_per_node=per_node,
        efficiency=acc.efficiency if cfg.efficiency is None else cfg.efficiency,
        memory_headroom=cfg.memory_headroom, model_name=cfg.model.name,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: PlanReport) -> str:
    i, e = report.inputs, report.estimate
    out = [f"Plan: {i['model_name']} ({i['num_params'] / 1e9:.2f}B parameters) on {i['world']} x {i['accelerator']}"
           f" = dp {i['dp']} x tp {i['tp']} ({i['devices_per_node']} per node; tp over {i['intra_link']}, dp over"
           f" {i['intra_link'] if i['world'] <= i['devices_per_node'] else i['inter_link']}), {i['precision']},"
           f" seq {i['seq_len']}, micro-batch {i['batch_size']} x {i['accumulate']}, SP={i['sequence_parallel']},"
           f" loss parallel={i['loss_parallel']}, FSDP={i['fsdp']}, activation checkpointing="
           f"{i['activation_checkpointing']}, float8={i['float8']}, async TP={i['async_tp']}", "",
           "Applied plan (block 0 shown; every block is the same"
           + ("; at tp=1 the strategy applies no TP style, only FSDP2):" if i["tp"] == 1 else "):")]
    out.append(_table(["module", "style", "layouts", "shape", "tp-local", "rank 0 (tp+fsdp)"], [
        [r["module"], r["style"], " ".join(f"{k}={v}" for k, v in r["layouts"].items()),
         r["shape"] or "-", r["tp_local"] or "-", r["rank0_local"] or "-"] for r in report.plan]))
    out += ["", f"Memory per rank (device {_gib(i['device_memory'])}, headroom {i['memory_headroom']:.0%}):"]
    out.append(_table(["part", "bytes"], [[k, _gib(v)] for k, v in report.memory.items()]
                      + [["total", _gib(sum(report.memory.values()))]]))
    out.append(_table(["ranks", "local params (unpadded)", "stored (padded)", "total", "fits"], [
        [g["ranks"], f"{g['local_parameters']:,}", f"{g['stored_parameters_padded']:,}", _gib(g["memory_total"]),
         g["fits"]] for g in report.ranks]))
    out += ["", "Activations saved per decoder layer per micro-batch:"]
    out.append(_table(["tensor", "bytes"], [[k, _gib(v)] for k, v in report.activations_per_layer.items()]))
    out += ["", "Communication per optimizer step per rank:"]
    out.append(_table(["group", "collective", "where", "calls", "bytes/call", "sent/rank", "link", "time"], [
        [c["group"], c["kind"], c["where"], c["calls"], _gib(c["tensor_bytes"]), _gib(c["bytes_per_rank"]), c["link"],
         f"{c['seconds'] * 1e3:,.1f} ms"] for c in report.communication] or [["-"] * 8]))
    out += ["", f"Estimate ({i['accelerator']}, efficiency {i['efficiency']}; TP comm exposed, FSDP overlapped):"]
    out.append(_table(["", "value"], [
        ["compute", f"{e['compute_s'] * 1e3:,.1f} ms"],
        ["TP communication (exposed)", f"{e['tp_comm_s'] * 1e3:,.1f} ms"],
        ["FSDP communication (total / exposed)",
         f"{e['fsdp_comm_s'] * 1e3:,.1f} / {e['fsdp_exposed_s'] * 1e3:,.1f} ms"],
        ["optimizer step", f"{e['optimizer_s'] * 1e3:,.1f} ms"], ["step time", f"{e['step_s'] * 1e3:,.1f} ms"],
        ["tokens per step", f"{e['tokens_per_step']:,}"],
        ["tokens/s per device", f"{e['tokens_per_s_per_device']:,.0f}"], ["MFU", f"{e['mfu']:.1%}"]]))
    if report.recommendation:
        out += ["", "Recommendation (same devices and micro-batch; fitting layouts first, fastest first):"]
        out.append(_table(["#", "tp", "dp", "activation ckpt", "memory", "fits", "step", "tokens/s/device", "MFU"], [
            [n + 1, c["tp"], c["dp"], c["activation_checkpointing"], _gib(c["memory"]), c["fits"],
             f"{c['step_s'] * 1e3:,.0f} ms", f"{c['tokens_per_s_per_device']:,.0f}", f"{c['mfu']:.1%}"]
            for n, c in enumerate(report.recommendation)]))
        if not report.recommendation[0]["fits"]:
            out.append("No layout fits: add devices (strategy.data_parallel_size), shorten data.seq_len or"
                       " data.batch_size, or pick an accelerator with more memory.")
    return "\n".join(out)


USAGE = """usage: lightning-tp plan [key=value ...] [--json] [--cfg]

Estimate memory, communication and step time of a layout without a GPU, and recommend (tp, dp, checkpointing).
Examples:
  lightning-tp plan model=llama3_8b strategy.tensor_parallel_size=1 strategy.data_parallel_size=8
  lightning-tp plan model=llama3_70b strategy.tensor_parallel_size=8 strategy.data_parallel_size=32 \\
      strategy.activation_checkpointing=full accelerator=h100 link=ib_ndr
Keys: model (a preset; model.<field> overrides), strategy.* (tensor_parallel_size, data_parallel_size,
sequence_parallel, loss_parallel, fsdp, reshard_after_forward, activation_checkpointing, float8, async_tp),
trainer.precision / accumulate_grad_batches / devices / num_nodes, data.seq_len, data.batch_size, accelerator,
link, intra_node_link, devices_per_node, efficiency, memory_headroom, hardware_file, output=text|json, top.
See docs/planner.md."""


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return
    as_json = "--json" in argv
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a not in ("--json", "--cfg")]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise SystemExit(f"lightning-tp plan: arguments {bad} are not key=value overrides or --json/--cfg.\n{USAGE}")
    try:
        inputs, cfg = compose_inputs(overrides)
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return
        report = analyze(inputs, top=cfg.top)
    except LightningTPError as e:  # the typed error stays attached as __cause__ for callers that catch SystemExit
        raise SystemExit(f"lightning-tp plan: {type(e).__name__}: {e}") from e
    print(report.to_json() if as_json or cfg.output == "json" else format_report(report))


if __name__ == "__main__":
    main()
