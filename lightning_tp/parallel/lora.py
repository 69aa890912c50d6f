"""LoRA adapters (PEFT's ``lora.Linear``) next to tensor-parallel base layers, sharded so that a
decoder layer keeps its communication minimum.

A PEFT model wraps each targeted projection: ``q_proj`` becomes a ``lora.Linear`` holding
``base_layer`` (the original ``nn.Linear``), ``lora_A[name]`` (``in → r``) and ``lora_B[name]``
(``r → out``), and computes ``base_layer(x) + lora_B(lora_A(dropout(x))) · scaling``. The auto plan
finds the family's style for ``q_proj`` and hands the wrapper to :func:`lora_style`, which derives
the adapters' sharding from the base's:

* **Column-parallel base** (q/k/v, gate/up; :class:`LoraColwise`): the input ``x`` is the whole
  (replicated) activation, the output is split by rows. ``lora_A`` is replicated, ``lora_B`` split
  by rows exactly as the base (the same style: head-aware, fused or plain), so ``B·A·x`` lands on
  the rank that holds those output rows. Forward: no communication. Backward: the gradient of
  ``A·x`` is a partial sum over the ranks (each holds some output rows), so the input gradient
  joins the base's partial sum, reduced once at the attention / MLP boundary as before; ``A``'s
  weight gradient is a partial sum, reduced over the TP group once per step (``r·in`` elements).
* **Row-parallel base** (o_proj, down_proj; :class:`LoraRowwise`): the input is split by columns and
  the output is a partial sum that the base reduces (all-reduce, or reduce-scatter under SP).
  ``lora_A`` is split by columns like the base, so ``A·x`` is a partial sum too; ``lora_B`` is
  replicated and linear, so ``B·(A·x)`` is still a partial sum, and it is added to the base's
  *before* the one reduction: forward and backward move exactly the bytes of the base alone.
  ``B``'s weight gradient is then a partial sum (its input ``A·x`` differs per rank), reduced over
  the TP group once per step (``out·r`` elements).

Per decoder layer with every projection adapted: no extra collective on activations, forward or
backward; per step, one small all-reduce per adapted projection of its replicated factor's gradient
(FSDP2 does it when it reduces gradients, or the optimizer step without FSDP2).

What is refused (:class:`~lightning_tp.errors.PlanError`, at plan time): adapters on a module the
plan does not split as a column- or row-parallel ``nn.Linear`` (embeddings, ``lm_head``, norms,
experts), DoRA and other LoRA variants, ``lora_bias``, ``fan_in_fan_out`` and merged adapters.
Dropout on CPU draws each rank's mask from its own generator (seed the ranks alike); on GPUs
DTensor's RNG tracker coordinates it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lightning_tp.errors import PlanError
from lightning_tp.parallel.heads import HeadsRowwise, _replicate, _Select, head_layout, head_range
from lightning_tp.parallel.styles import replicate_parameters

__all__ = ["LoraColwise", "LoraRowwise", "adapt_styles", "is_lora_layer", "keep_dropout_masks",
           "lora_layers", "lora_style", "reset_adapters", "sub_styles"]


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of PEFT's LoRA layers (by ancestry; PEFT is not imported)."""
    return any(c.__name__ == "LoraLayer" and c.__module__.startswith("peft.")
               for c in type(module).__mro__)


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` of every PEFT LoRA layer inside ``module``."""
    return {name: m for name, m in module.named_modules() if is_lora_layer(m)}


def reset_adapters(module: nn.Module, seed: int | None = None,
                   only: set[int] | None = None) -> int:
    """Initialise the LoRA adapters inside ``module`` (those whose layer's ``id`` is in ``only``,
    if given) as their PEFT config says (``init_lora_weights``: ``A`` random, ``B`` zero by
    default), after a base model's ``init_weights`` overwrote them with a projection's init;
    ``seed`` makes every rank draw the same ``A``. Returns the number of adapters initialised."""
    done: set[tuple[int, str]] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        for owner in module.modules():
            configs = getattr(owner, "peft_config", None)
            if not isinstance(configs, dict):
                continue
            for layer in lora_layers(owner).values():
                for name in layer.lora_A:
                    if (id(layer), name) in done or (only is not None and id(layer) not in only):
                        continue
                    config = configs.get(name)
                    layer.reset_lora_parameters(
                        name, True if config is None else config.init_lora_weights)
                    done.add((id(layer), name))
    return len(done)


def _check_supported(path: str, layer: nn.Module) -> None:
    problems = []
    if not isinstance(getattr(layer, "base_layer", None), nn.Linear):
        problems.append(f"its base layer is a {type(getattr(layer, 'base_layer', None)).__name__},"
                        " not an nn.Linear")
    if getattr(layer, "lora_variant", None):
        problems.append(f"it uses a LoRA variant ({', '.join(sorted(layer.lora_variant))}:"
                        " DoRA or similar); use plain LoRA (use_dora=False)")
    if any(getattr(layer, "lora_bias", {}).values()):
        problems.append("it has lora_bias=True; use lora_bias=False")
    if getattr(layer, "fan_in_fan_out", False):
        problems.append("it has fan_in_fan_out=True (Conv1D weights); the plan shards nn.Linear")
    if getattr(layer, "merged", False):
        problems.append("its adapters are merged into the base; unmerge them before training")
    if getattr(layer, "lora_embedding_A", None):
        problems.append("it has embedding adapters")
    if problems:
        raise PlanError(f"LoRA layer {path!r} cannot be tensor-parallel: " + "; ".join(problems)
                        + ". Fix: leave it out of LoraConfig(target_modules=...) (adapters follow"
                        " the attention and MLP projections, nn.Linear), or train it at"
                        " tensor_parallel_size=1.")


def lora_style(path: str, layer: nn.Module, base: ParallelStyle) -> ParallelStyle:
    """The style for the PEFT wrapper ``layer`` at ``path`` whose base the plan gives ``base``;
    :class:`PlanError` when the adapters cannot follow that style."""
    _check_supported(path, layer)
    linear_like = isinstance(base, (ColwiseParallel, RowwiseParallel))
    accepted = ((Replicate(),) if isinstance(base, ColwiseParallel) else (Shard(-1), Replicate()))
    if linear_like and getattr(base, "input_layouts", (Replicate(),))[0] not in accepted:
        linear_like = False  # lm_head: its input arrives sequence-sharded
    if isinstance(base, ColwiseParallel) and linear_like:
        return LoraColwise(base)
    if isinstance(base, RowwiseParallel) and linear_like:
        return LoraRowwise(base)
    raise PlanError(
        f"LoRA adapters on {path!r}, which the plan gives {type(base).__name__}: adapters can"
        " follow a column- or row-parallel projection only (the attention and MLP projections)."
        " Fix: leave it out of LoraConfig(target_modules=...), e.g. target_modules=['q_proj',"
        " 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'].")


def adapt_styles(module: nn.Module, styles: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """``styles`` (exact paths in ``module``) with each PEFT LoRA layer's base style replaced by
    its :func:`lora_style`; :class:`PlanError` for an adapted module the plan leaves whole."""
    layers = lora_layers(module)
    if not layers:
        return styles
    adapted = dict(styles)
    unplanned = []
    for path, layer in layers.items():
        base = adapted.pop(f"{path}.base_layer", None) or adapted.get(path)
        if base is None:
            unplanned.append(path)
            continue
        adapted[path] = lora_style(path, layer, base)
    inside = [p for p in adapted for layer in layers if p.startswith(layer + ".")]
    if unplanned or inside:
        what = (f"modules the plan does not shard ({', '.join(unplanned[:3])}"
                f"{' ...' if len(unplanned) > 3 else ''})" if unplanned
                else f"plan entries inside LoRA layers ({', '.join(inside[:3])})")
        raise PlanError(
            f"LoRA adapters sit on {what}; adapters can only follow a projection the plan splits."
            " Fix: target the attention and MLP projections in LoraConfig(target_modules=...), or"
            " give the plan an entry for the wrapped module itself (its base style).")
    return adapted


def sub_styles(style: ParallelStyle, layer: nn.Module) -> dict[str, ParallelStyle | None]:
    """``{path inside the PEFT layer: the style its parameters are split by}`` for a
    :class:`LoraColwise` / :class:`LoraRowwise` ``style`` (``None``: replicated), so that shapes
    per rank can be read with :func:`~lightning_tp.parallel.plans.tp_shard_dim` without a mesh."""
    column = isinstance(style, LoraColwise)
    styles: dict[str, ParallelStyle | None] = {"base_layer": style.base}
    for name in layer.lora_A:
        styles[f"lora_A.{name}"] = None if column else style.base
        styles[f"lora_B.{name}"] = style.base if column else None
    return styles


class LoraColwise(ParallelStyle):
    """A PEFT ``lora.Linear`` over a column-parallel base: ``base_layer`` and ``lora_B`` take the
    base's style (the same output rows on each rank), ``lora_A`` is replicated and hands ``lora_B``
    a replicated DTensor, so its gradient's partial sums meet the base's at the block boundary."""

    def __init__(self, base: ColwiseParallel) -> None:
        super().__init__()
        self.base = base

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        self.base._apply(module.base_layer, device_mesh)
        for name in module.lora_A:
            # replicated; the layer's forward (_ColumnParallelLora) hands it the whole input
            distribute_module(module.lora_A[name], device_mesh, replicate_parameters)
            self.base._apply(module.lora_B[name], device_mesh)
        module.__class__ = _column_parallel(type(module))
        module.tp_mesh = device_mesh
        return module


def _dropout_p(dropout: nn.Module) -> float:
    """The drop probability of a PEFT ``lora_dropout`` entry while it drops (0 for ``Identity`` or
    in eval mode)."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


class _DroppedLinear(torch.autograd.Function):
    """``F.linear(dropout(x, p), weight)`` that keeps ``x`` and a 1-byte mask for backward, not the
    dropped copy of ``x``. PEFT gives every adapted projection its own dropout, so q, k, v,
    gate and up would each keep a copy of the whole gathered activation (under SP): 5·b·s·h
    elements per layer, more than the rest of the layer. ``x`` is kept anyway (one tensor for all
    the projections that read it), the masks take a byte per element."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, p: float) -> Tensor:
        keep = torch.rand_like(x, dtype=torch.float32) >= p
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(x, weight, keep)
        return F.linear(x * keep * ctx.scale, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * keep * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).flatten(0, -2)
            grad_w = grad.flatten(0, -2).transpose(0, 1) @ dropped
        return grad_x, grad_w, None


def _lora_input(layer: nn.Module, adapter: str, x: Tensor, weight: Tensor) -> Tensor:
    """``lora_A(dropout(x))`` of ``adapter`` with ``weight`` as ``lora_A``'s weight (whole or the
    rank's columns), keeping a mask rather than a dropped copy when the dropout drops."""
    x = layer._cast_input_dtype(x, weight.dtype)
    p = _dropout_p(layer.lora_dropout[adapter])
    return _DroppedLinear.apply(x, weight, p) if p > 0 else F.linear(x, weight)


def keep_dropout_masks(module: nn.Module) -> int:
    """Give every plain PEFT LoRA layer inside ``module`` that no style took over (tp 1: the plan is
    not applied) the forward whose input dropout keeps a mask, not a dropped copy
    (:class:`_DroppedLinear`), so that a layer keeps the same for backward at every tp. Variants
    PEFT computes differently (DoRA, ...) keep PEFT's forward. Returns the layers changed."""
    changed = 0
    for path, layer in lora_layers(module).items():
        if isinstance(layer, (_ColumnParallelLora, _RowParallelLora)):
            continue
        try:
            _check_supported(path, layer)
        except PlanError:
            continue
        layer.__class__ = _column_parallel(type(layer))
        layer.tp_mesh = None
        changed += 1
    return changed


class _ColumnParallelLora:
    """Forward of a column-parallel ``lora.Linear`` (and of any ``lora.Linear`` at tp 1, where
    ``tp_mesh`` is None): PEFT's, with each adapter's input dropout kept as a mask
    (:class:`_DroppedLinear`)."""

    tp_mesh: Any

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise PlanError("Mixed-adapter batches (adapter_names=) are not supported under tensor"
                            " parallelism.")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        dtype = result.dtype
        if self.tp_mesh is not None and not isinstance(x, DTensor):  # a plan without
            # PrepareModuleInput: the same activation, replicated
            x = DTensor.from_local(x, self.tp_mesh, [Replicate()], run_check=False)
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            h = _lora_input(self, adapter, x, self.lora_A[adapter].weight)
            result = result + self.lora_B[adapter](h) * self.scaling[adapter]
        return result.to(dtype)


class LoraRowwise(ParallelStyle):
    """A PEFT ``lora.Linear`` over a row-parallel base: ``base_layer`` and ``lora_A`` split by input
    columns (or, for query heads tp does not divide, replicated with the rank's head columns
    selected, as :class:`~lightning_tp.parallel.heads.HeadsRowwise`), ``lora_B`` replicated; the
    base's and the adapters' partial sums are added and reduced once to the base's output
    layout."""

    def __init__(self, base: RowwiseParallel) -> None:
        super().__init__()
        self.base = base

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        base = self.base
        tp, rank = device_mesh.size(), device_mesh.get_local_rank()
        linear: nn.Linear = module.base_layer
        columns = None
        if isinstance(base, HeadsRowwise) and head_layout(base.num_heads, base.num_heads,
                                                          tp).q_replicated:
            if linear.bias is not None:
                raise PlanError("Uneven query heads need an o_proj without bias (the Llama"
                                " family's).")
            head_dim = linear.in_features // base.num_heads
            first, n = head_range(base.num_heads, tp, rank)
            columns = list(range(first * head_dim, (first + n) * head_dim))
        for owner in (linear, *module.lora_A.values()):
            if columns is not None:
                _replicate(base, owner, device_mesh)
                continue
            for name, param in list(owner.named_parameters(recurse=False)):
                placement = Shard(1) if name == "weight" else Replicate()
                owner.register_parameter(name, nn.Parameter(
                    distribute_tensor(param, device_mesh, [placement]), param.requires_grad))
        for lora_b in module.lora_B.values():
            for name, param in list(lora_b.named_parameters(recurse=False)):
                lora_b.register_parameter(name, nn.Parameter(
                    distribute_tensor(param, device_mesh, [Replicate()]), param.requires_grad))
        module.__class__ = _row_parallel(type(module))
        module.tp_mesh, module.output_layout = device_mesh, base.output_layouts[0]
        module.input_layout = base.input_layouts[0]  # Shard(-1), or Replicate(): split here
        module.head_columns = columns
        return module


class _RowParallelLora:
    """Forward of a row-parallel ``lora.Linear``: PEFT's sum of the base and the active adapters,
    computed on the rank's columns and reduced once."""

    tp_mesh: Any
    output_layout: Any
    input_layout: Any
    head_columns: list[int] | None

    def _columns(self, weight: Tensor) -> Tensor:
        """The rank's columns of a weight split like the base's input."""
        local = weight.to_local()
        if self.head_columns is None:
            return local
        index = getattr(self, "_head_index", None)
        if index is None or index.device != local.device:
            index = self._head_index = torch.tensor(self.head_columns, device=local.device)
        return _Select.apply(local, index, 1, self.tp_mesh.get_group())

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.get("adapter_names") is not None:
            raise PlanError("Mixed-adapter batches (adapter_names=) are not supported under tensor"
                            " parallelism.")
        if not isinstance(x, DTensor):  # the rank's columns, or the whole input to split
            x = DTensor.from_local(x, self.tp_mesh, [self.input_layout], run_check=False)
        x = x.redistribute(self.tp_mesh, [Shard(-1)]).to_local()
        base = self.base_layer
        partial = F.linear(x, self._columns(base.weight))
        dtype = partial.dtype
        if not self.disable_adapters:
            for adapter in self.active_adapters:
                if adapter not in self.lora_A:
                    continue
                a = self._columns(self.lora_A[adapter].weight)
                # B sees a partial sum; its weight gradient is one too, summed over the ranks
                b = self.lora_B[adapter].weight.to_local(grad_placements=(Partial(),))
                h = _lora_input(self, adapter, x, a)
                partial = partial + F.linear(h, b) * self.scaling[adapter]
        out = DTensor.from_local(partial.to(dtype), self.tp_mesh, [Partial()], run_check=False)
        out = out.redistribute(self.tp_mesh, [self.output_layout])
        if base.bias is not None:
            out = out + base.bias
        return out.to_local()


@functools.cache
def _row_parallel(cls: type) -> type:
    return type(f"RowParallel{cls.__name__}", (_RowParallelLora, cls), {"__module__": __name__})


@functools.cache
def _column_parallel(cls: type) -> type:
    return type(f"ColumnParallel{cls.__name__}", (_ColumnParallelLora, cls),
                {"__module__": __name__})
