"""Attention heads that do not split evenly over the TP ranks: replicated projections with per-rank
head selection.

The Llama plan splits ``q_proj``/``k_proj``/``v_proj`` by output rows and ``o_proj`` by input
columns, one block of whole heads per rank. That needs tp to divide the query heads and the KV
heads. Two cases do not fit, and are handled here by keeping the projection whole on every rank (a
``Replicate()`` DTensor: the unsharded model's names and checkpoint shapes) and letting each rank
compute only the heads it is responsible for:

* **Fewer KV heads than tp** (TinyLlama: 32 query / 4 KV heads at tp 8). With tp a multiple of
  the KV heads and of nothing else to fix, rank ``r``'s query heads all use KV head
  ``r // (tp / kv)``: the rank computes that one KV head, and attention is grouped-query attention
  on the rank.
* **Query heads that tp does not divide** (SmolLM2: 9 heads at tp 2 as 5 + 4). Query heads are
  split head-aligned and as evenly as possible (:func:`head_range`); ``q_proj`` and ``o_proj``
  are replicated and each rank takes the rows (columns) of its heads; ``k_proj``/``v_proj`` give
  each local query head its own copy of the KV head it uses, so attention on the rank is plain
  multi-head attention whatever the grouping. The compute per rank follows its head count
  (5 : 4 at tp 2).

Exactness: the forward is the unsharded computation restricted to the rank's heads. In backward,
a projection's input gradient is a partial sum over the ranks (each contributes its heads), summed
at the attention boundary as for the split projections; the weight gradient of a replicated
projection is the sum over the ranks, one all-reduce of that projection's gradient over the TP
group. Extra communication per decoder layer, backward only: one all-reduce per replicated
projection (``k_proj``, ``v_proj``: ``kv · head_dim · hidden`` elements each; ``q_proj``,
``o_proj``: ``q · head_dim · hidden`` each). Memory: the replicated projections are not divided by
tp.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from lightning_tp.errors import ModelShapeError, PlanError

__all__ = [
    "SPLIT_BY_HEAD",
    "HeadLayout",
    "HeadsColwise",
    "HeadsRowwise",
    "KVHeadsColwise",
    "head_layout",
    "head_range",
    "localize_kv_groups",
    "rank_heads",
    "shown_style",
]


def head_range(num_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """``(first head, number of heads)`` of TP rank ``rank``: whole heads, the first
    ``num_heads % tp`` ranks holding one more."""
    base, extra = divmod(num_heads, tp)
    return rank * base + min(rank, extra), base + (rank < extra)


@dataclass(frozen=True)
class HeadLayout:
    """How the Llama plan places a model's attention heads over ``tp`` ranks."""

    q_replicated: bool
    """Query heads that tp does not divide: ``q_proj``/``o_proj`` replicated, heads selected."""
    kv_replicated: bool
    """``k_proj``/``v_proj`` replicated, KV heads selected per rank (fewer KV heads than tp, or
    uneven query heads)."""


def head_layout(num_heads: int, num_key_value_heads: int, tp: int) -> HeadLayout:
    """The layout for ``tp``; raises :class:`ModelShapeError` when tp exceeds the query heads."""
    if tp > num_heads:
        raise ModelShapeError(
            f"num_attention_heads={num_heads} is fewer than tensor_parallel_size={tp}: each rank"
            f" needs at least one whole query head. Fix: choose a tensor_parallel_size of at most"
            f" {num_heads}.")
    q_replicated = num_heads % tp != 0
    return HeadLayout(q_replicated, q_replicated or num_key_value_heads % tp != 0)


def rank_heads(num_heads: int, num_key_value_heads: int, tp: int,
               rank: int) -> tuple[list[int], list[int]]:
    """``(query heads, KV heads)`` that TP rank ``rank`` computes when its heads are selected: its
    :func:`head_range` of query heads, and the one KV head they share (tp a multiple of the KV
    heads, query heads split evenly) or else one KV head per local query head, the one it uses."""
    q, kv = num_heads, num_key_value_heads
    first, n = head_range(q, tp, rank)
    if not head_layout(q, kv, tp).q_replicated and tp % kv == 0:
        return list(range(first, first + n)), [rank // (tp // kv)]
    return list(range(first, first + n)), [i // (q // kv) for i in range(first, first + n)]


SPLIT_BY_HEAD = {"HeadsColwise": "ColwiseParallel", "KVHeadsColwise": "ColwiseParallel",
                 "HeadsRowwise": "RowwiseParallel"}
"""The head-aware styles and the style each one is when tp splits its heads evenly."""


def shown_style(name: str, layout: HeadLayout) -> tuple[str, bool]:
    """``(name to report, replicated)`` for a style named ``name`` under ``layout``: a head-aware
    style that splits evenly is reported as the torch style it then is."""
    if name not in SPLIT_BY_HEAD:
        return name, False
    replicated = layout.kv_replicated if name == "KVHeadsColwise" else layout.q_replicated
    return (f"{name} (replicated)" if replicated else SPLIT_BY_HEAD[name]), replicated


def _replicate(style: Any, module: nn.Module, device_mesh: Any) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        replicated = distribute_tensor(param, device_mesh, [Replicate()],
                                       src_data_rank=style.src_data_rank)
        module.register_parameter(name, nn.Parameter(replicated, param.requires_grad))


def _select(module: nn.Module, device_mesh: Any, index: list[int], dim: int,
            output_layout: Any = None) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise PlanError(f"Head selection applies to nn.Linear projections, got"
                        f" {type(module).__name__}.")
    module.__class__ = _head_selecting(type(module))
    module.head_index = torch.tensor(index, dtype=torch.long)
    module.select_dim, module.tp_mesh, module.output_layout = dim, device_mesh, output_layout
    return module


class HeadsColwise(ColwiseParallel):
    """``q_proj``: split by head when tp divides ``num_heads``, else replicated with each rank's
    head-aligned rows selected (:func:`head_range`)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp = device_mesh.size()
        if not head_layout(self.num_heads, self.num_heads, tp).q_replicated:
            return super()._apply(module, device_mesh)
        head_dim = module.out_features // self.num_heads
        first, n = head_range(self.num_heads, tp, device_mesh.get_local_rank())
        _replicate(self, module, device_mesh)
        rows = list(range(first * head_dim, (first + n) * head_dim))
        return _select(module, device_mesh, rows, 0)


class KVHeadsColwise(ColwiseParallel):
    """``k_proj``/``v_proj``: split by head when tp divides the query and the KV heads; otherwise
    replicated, each rank computing the KV heads its query heads use (one, shared, when tp is a
    multiple of the KV heads and divides the query heads; else one copy per local query head)."""

    def __init__(self, num_key_value_heads: int, num_heads: int | None = None) -> None:
        super().__init__()
        self.num_key_value_heads = num_key_value_heads
        self.num_heads = num_heads

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp, kv = device_mesh.size(), self.num_key_value_heads
        q = self.num_heads if self.num_heads is not None else kv
        layout = head_layout(q, kv, tp)
        if not layout.kv_replicated:
            return super()._apply(module, device_mesh)
        head_dim = module.out_features // kv
        _, heads = rank_heads(q, kv, tp, device_mesh.get_local_rank())
        _replicate(self, module, device_mesh)
        rows = [h * head_dim + d for h in heads for d in range(head_dim)]
        return _select(module, device_mesh, rows, 0)


class HeadsRowwise(RowwiseParallel):
    """``o_proj``: split by head when tp divides ``num_heads``, else replicated with the columns of
    each rank's heads selected; the partial sums are reduced to ``output_layouts`` as in
    ``RowwiseParallel``."""

    def __init__(self, num_heads: int, *, output_layouts: Any = None) -> None:
        super().__init__(output_layouts=output_layouts)
        self.num_heads = num_heads

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp = device_mesh.size()
        if not head_layout(self.num_heads, self.num_heads, tp).q_replicated:
            return super()._apply(module, device_mesh)
        if getattr(module, "bias", None) is not None:
            raise PlanError("Uneven query heads need an o_proj without bias (the Llama family's).")
        head_dim = module.in_features // self.num_heads
        first, n = head_range(self.num_heads, tp, device_mesh.get_local_rank())
        _replicate(self, module, device_mesh)
        columns = list(range(first * head_dim, (first + n) * head_dim))
        return _select(module, device_mesh, columns, 1, self.output_layouts[0])


class _Select(torch.autograd.Function):
    """``full.index_select(dim, index)`` of a replicated tensor; backward: the gradient scattered
    into the full shape and summed over the TP group (every rank contributes its heads)."""

    @staticmethod
    def forward(ctx: Any, full: Tensor, index: Tensor, dim: int, group: Any) -> Tensor:
        ctx.shape, ctx.dim, ctx.group = full.shape, dim, group
        ctx.save_for_backward(index)
        return full.index_select(dim, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (index,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.shape).index_add_(ctx.dim, index, grad)
        dist.all_reduce(full, group=ctx.group)
        return full, None, None, None


class _HeadSelectingLinear:
    """Forward of a replicated projection: this rank's heads only."""

    head_index: Tensor
    select_dim: int
    tp_mesh: Any
    output_layout: Any

    def forward(self, x: Tensor) -> Tensor:
        group = self.tp_mesh.get_group()
        if self.head_index.device != self.weight.device:  # once, after materialisation
            self.head_index = self.head_index.to(self.weight.device)
        index = self.head_index
        weight = _Select.apply(self.weight.to_local(), index, self.select_dim, group)
        if self.select_dim == 1:  # o_proj: this rank's heads in, a partial sum of the output out
            partial = DTensor.from_local(F.linear(x, weight), self.tp_mesh, [Partial()],
                                         run_check=False)
            layout = self.output_layout or Replicate()
            return partial.redistribute(self.tp_mesh, [layout]).to_local()
        # q/k/v: the input is the attention's replicated DTensor; this rank's input gradient is a
        # partial sum, reduced at the attention boundary with the other projections'.
        if not isinstance(x, DTensor):
            raise PlanError("A replicated q_proj/k_proj/v_proj needs the attention input as a"
                            " replicated DTensor (the Llama plan's PrepareModuleInput on"
                            " self_attn).")
        local = x.to_local(grad_placements=(Partial(),))
        bias = (None if self.bias is None
                else _Select.apply(self.bias.to_local(), index, 0, group))
        return F.linear(local, weight, bias)


@functools.cache
def _head_selecting(cls: type) -> type:
    return type(f"HeadSelecting{cls.__name__}", (_HeadSelectingLinear, cls),
                {"__module__": __name__})


def _local_rows(projection: nn.Module) -> int:
    projection = getattr(projection, "base_layer", projection)  # a PEFT LoRA layer's projection
    if isinstance(projection, _HeadSelectingLinear):
        return len(projection.head_index)
    weight = projection.weight
    return (weight.to_local() if isinstance(weight, DTensor) else weight).shape[0]


def localize_kv_groups(module: nn.Module) -> None:
    """Hugging Face attention modules repeat each KV head ``num_key_value_groups`` times (query
    heads per KV head, from the config). Where this rank's KV heads were selected, the repeat
    count on the rank is its query rows over its KV rows: set it on those attention modules. The
    native Llama infers it from the shapes and has no such attribute."""
    for attention in module.modules():
        k_proj = getattr(attention, "k_proj", None)
        k_proj = getattr(k_proj, "base_layer", k_proj)  # a PEFT LoRA layer's projection
        if isinstance(k_proj, _HeadSelectingLinear) and hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = _local_rows(attention.q_proj) // _local_rows(k_proj)
