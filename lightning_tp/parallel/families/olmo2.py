"""The OLMo-2 family (transformers' ``Olmo2ForCausalLM``: OLMo-2-1B 16/16 heads, 7B 32/32, 13B
40/40): the Llama plan with post-norms and full-width q/k norms.

What it needs beyond Llama:

* **Post-norms.** The decoder layer has no ``input_layernorm``: attention and MLP read the block's
  residual stream directly, and ``post_attention_layernorm`` / ``post_feedforward_layernorm``
  normalise each sublayer's output before its residual add. Both norms see the sublayer output
  as ``o_proj`` / ``down_proj`` leave it (sequence-sharded with SP, replicated without), so they
  are planned like Llama's norms; the attention and MLP inputs are prepared as Llama's.
* **Full-width q/k norms.** ``q_norm`` / ``k_norm`` are RMSNorms over the whole projection width
  (``num_heads * head_dim``), not per head, and ``q_proj`` / ``k_proj`` are column-sharded by
  head. :class:`FullWidthShardedNorm` keeps the norm's weight ``Shard(0)`` like the projection's
  rows (each rank scales its own columns; its weight gradient is local) and sums the squares over
  the TP ranks with one all-reduce of a ``(batch, seq, 1)`` tensor.

Extra collectives per decoder layer, TP and TP + SP alike: forward 2 all-reduces (q and k norms'
sums of squares), backward 2 all-reduces (the gradients of those sums, which every rank's columns
contribute to), each of ``batch * seq`` floats (attention sees the whole sequence): negligible
next to the per-layer activations. Refused before spawn (``shape_problems``): a tp that does not
divide the heads (uneven or replicated heads would need the norm's rows selected as the heads are).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_tp.errors import PlanError
from lightning_tp.parallel.families.base import Family, register_family
from lightning_tp.parallel.families.llama import llama_plan
from lightning_tp.parallel.styles import ReplicateParallel, SequenceParallelNorm

__all__ = ["OLMO2", "FullWidthShardedNorm", "olmo2_plan"]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) over the TP group, forward and backward: the local sums of squares of a
    norm's columns become the full width's, and the gradient every rank's columns send back to
    that sum is summed the same way."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: Any) -> Tensor:
        ctx.group = group
        total = local.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _FullWidthNorm:
    """Forward of an RMSNorm over columns split across ranks (Olmo2RMSNorm's arithmetic)."""

    full_width: int
    tp_mesh: Any

    def forward(self, x: Tensor) -> Tensor:  # (bs, seqlen, local width)
        dtype = x.dtype
        x = x.to(torch.float32)
        squares = _SumOverRanks.apply(x.pow(2).sum(-1, keepdim=True), self.tp_mesh.get_group())
        x = x * torch.rsqrt(squares / self.full_width + self.variance_epsilon)
        return (self.weight.to_local() * x).to(dtype)


@functools.cache
def _full_width(cls: type) -> type:
    return type(f"FullWidth{cls.__name__}", (_FullWidthNorm, cls), {"__module__": __name__})


class FullWidthShardedNorm(ParallelStyle):
    """An RMSNorm over the full width of a column-sharded projection (OLMo-2's ``q_norm`` /
    ``k_norm``), applied to the rank's columns: weight ``Shard(0)``, the sum of squares
    all-reduced (one ``(bs, seqlen, 1)`` all-reduce forward, one backward). Input and output are
    the projection's local columns (plain tensors)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        weight = getattr(module, "weight", None)
        if (not isinstance(weight, nn.Parameter) or weight.ndim != 1
                or not isinstance(getattr(module, "variance_epsilon", None), float)):
            raise PlanError(f"FullWidthShardedNorm applies to an RMSNorm with a 1-D `weight` and"
                            f" `variance_epsilon` (Olmo2RMSNorm), got {type(module).__name__}.")
        if weight.shape[0] % device_mesh.size():
            raise PlanError(f"{type(module).__name__} of width {weight.shape[0]} cannot be split"
                            f" over tensor_parallel_size={device_mesh.size()}.")
        module.full_width = weight.shape[0]
        module.register_parameter("weight", nn.Parameter(
            distribute_tensor(weight, device_mesh, [Shard(0)]), weight.requires_grad))
        module.__class__ = _full_width(type(module))
        module.tp_mesh = device_mesh
        return module


def olmo2_plan(model: nn.Module, *, sequence_parallel: bool, loss_parallel: bool,
               **_: Any) -> dict[str, ParallelStyle]:
    """The Llama plan without ``input_layernorm``, with OLMo-2's post-feedforward norm and its
    full-width q/k norms."""
    plan = llama_plan(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    del plan["model.layers.*.input_layernorm"]
    # The post-norms' outputs meet the residual stream (plain local tensors), not a module input.
    norm = SequenceParallelNorm(use_local_output=True) if sequence_parallel else ReplicateParallel()
    plan["model.layers.*.post_attention_layernorm"] = norm
    plan["model.layers.*.post_feedforward_layernorm"] = norm
    # Without head counts llama_plan splits q/k/v/o evenly by head (no head selection), so the
    # norms' rows follow the projections'.
    plan["model.layers.*.self_attn.q_norm"] = FullWidthShardedNorm()
    plan["model.layers.*.self_attn.k_norm"] = FullWidthShardedNorm()
    return plan


OLMO2 = register_family(Family(
    "olmo2", ("Olmo2ForCausalLM",), olmo2_plan,
    extras="forward 2 all-reduces and backward 2 all-reduces of (batch, seq, 1) floats:"
           " the full-width q_norm/k_norm sums of squares"))
