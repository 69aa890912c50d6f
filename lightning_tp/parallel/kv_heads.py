"""Key/value projections when the TP degree exceeds the key/value heads: KV-head replication.

With grouped-query attention a model may have fewer KV heads than TP ranks (TinyLlama: 32 query
heads, 4 KV heads, at tp 8). Splitting ``k_proj``/``v_proj`` by columns would cut a head. Instead,
when ``tp`` is a multiple of the KV heads, every TP rank holds the whole (small) projection as a
``Replicate()`` DTensor and computes only the KV head its query heads use: rank ``r`` holds query
heads ``[r·q/tp, (r+1)·q/tp)``, which all belong to KV head ``r // (tp / kv)``. The attention then
sees one local KV head for its ``q/tp`` local query heads (grouped-query attention on the rank).

Exactness: the forward is the unsharded computation restricted to the rank's heads. In backward,
the input gradient of the projection is a partial sum (each rank contributes its heads), summed at
the attention boundary with the query projection's; the weight gradient of a KV head is the sum
over the ranks that hold it, computed with one all-reduce of the projection's gradient over the TP
group. Extra communication per decoder layer and backward: two all-reduces (``k_proj``,
``v_proj``) of ``kv · head_dim · hidden`` elements each (plus the biases, if any); no extra
forward communication. Parameter names and checkpoint shapes are those of the unsharded model.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel

from lightning_tp.errors import ModelShapeError, PlanError

__all__ = ["KVHeadsColwise", "localize_kv_groups", "replicates_kv_heads"]


def replicates_kv_heads(num_key_value_heads: int, tp: int) -> bool:
    """Whether :class:`KVHeadsColwise` replicates (``tp`` a multiple of the KV heads, larger)."""
    return tp > num_key_value_heads and tp % num_key_value_heads == 0


class KVHeadsColwise(ColwiseParallel):
    """``ColwiseParallel`` for ``k_proj``/``v_proj`` of a model with ``num_key_value_heads``: split
    by head when ``tp`` divides the KV heads, replicated with per-rank head selection when ``tp`` is
    a multiple of them (see the module docstring); any other ``tp`` is a
    :class:`ModelShapeError`."""

    def __init__(self, num_key_value_heads: int) -> None:
        super().__init__()
        self.num_key_value_heads = num_key_value_heads

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp, kv = device_mesh.size(), self.num_key_value_heads
        if kv % tp == 0:
            return super()._apply(module, device_mesh)
        if not replicates_kv_heads(kv, tp) or not isinstance(module, nn.Linear):
            raise ModelShapeError(
                f"num_key_value_heads={kv} can be neither split over nor replicated across"
                f" tensor_parallel_size={tp} (key/value heads must divide tp or be a multiple"
                f" of it). Fix: choose a tensor_parallel_size that divides {kv} or is a multiple"
                " of it.")
        head_dim = module.out_features // kv
        head = device_mesh.get_local_rank() // (tp // kv)
        for name, param in list(module.named_parameters(recurse=False)):
            replicated = distribute_tensor(param, device_mesh, [Replicate()],
                                           src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(replicated, param.requires_grad))
        module.__class__ = _head_selecting(type(module))
        module.kv_rows = (head * head_dim, head_dim)
        module.kv_group = device_mesh.get_group()
        return module


class _HeadRows(torch.autograd.Function):
    """Rows ``[start, start + n)`` of a replicated tensor; backward: the full gradient, summed over
    the TP group (every rank holding a head contributes to it)."""

    @staticmethod
    def forward(ctx: Any, full: Tensor, start: int, n: int, group: Any) -> Tensor:
        ctx.shape, ctx.start, ctx.n, ctx.group = full.shape, start, n, group
        return full.narrow(0, start, n).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        full = grad.new_zeros(ctx.shape)
        full.narrow(0, ctx.start, ctx.n).copy_(grad)
        dist.all_reduce(full, group=ctx.group)
        return full, None, None, None


class _HeadSelectingLinear:
    """Forward of a replicated ``k_proj``/``v_proj``: this rank's KV head only."""

    kv_rows: tuple[int, int]
    kv_group: Any

    def forward(self, x: Tensor) -> Tensor:
        start, n = self.kv_rows
        # The input is the attention's replicated DTensor: this rank's input gradient is a
        # partial sum, reduced at the attention boundary with the query projection's.
        if not isinstance(x, DTensor):
            raise PlanError("A replicated k_proj/v_proj needs the attention input as a replicated"
                            " DTensor (the Llama plan's PrepareModuleInput on self_attn).")
        local = x.to_local(grad_placements=(Partial(),))
        weight = _HeadRows.apply(self.weight.to_local(), start, n, self.kv_group)
        bias = (None if self.bias is None
                else _HeadRows.apply(self.bias.to_local(), start, n, self.kv_group))
        return F.linear(local, weight, bias)


@functools.cache
def _head_selecting(cls: type) -> type:
    return type(f"HeadSelecting{cls.__name__}", (_HeadSelectingLinear, cls),
                {"__module__": __name__})


def localize_kv_groups(module: nn.Module) -> None:
    """Hugging Face attention modules repeat each KV head ``num_key_value_groups`` times (query
    heads per KV head, from the config). Where this rank holds one replicated KV head for its
    ``q/tp`` query heads, the repeat count on the rank is ``q/tp``: set it on those attention
    modules. The native Llama infers it from the shapes and has no such attribute."""
    for attention in module.modules():
        k_proj = getattr(attention, "k_proj", None)
        if isinstance(k_proj, _HeadSelectingLinear) and hasattr(attention, "num_key_value_groups"):
            weight = attention.q_proj.weight
            weight = weight.to_local() if isinstance(weight, DTensor) else weight
            attention.num_key_value_groups = weight.shape[0] // k_proj.kv_rows[1]
