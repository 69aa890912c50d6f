"""Mixture-of-experts blocks under tensor parallelism: every expert split along its intermediate
dimension like a dense MLP, the router replicated, no expert parallelism.

transformers (v5) keeps a block's experts in one module with 3D parameters: ``gate_up_proj``
``(num_experts, 2 * intermediate, hidden)`` (every expert's gate rows, then its up rows) and
``down_proj`` ``(num_experts, hidden, intermediate)``; the router (``gate``) holds ``weight``
``(num_experts, hidden)``. Rank ``r`` of ``tp`` computes intermediate slice ``r`` of every expert:

* ``gate_up_proj``: gate rows slice ``r`` and up rows slice ``r``, so that the gated product
  pairs the rows the unsharded expert pairs. In the fused layout these are two blocks, not one, so
  the DTensor is a strided shard of the model's own ``(E, 2I, H)`` tensor (``full_tensor()`` is
  the model's layout). Caveat: torch.distributed.checkpoint writes a DTensor shard as one block
  and refuses this one ("overlapping chunks").
* ``down_proj``: intermediate columns slice ``r`` (``Shard(2)``); each rank's expert outputs are
  partial sums over the ranks.
* The router runs on the whole (replicated) block input on every rank, so every rank routes every
  token the same way; its weight is a ``Replicate()`` DTensor whose gradient, a partial sum over
  the ranks, is all-reduced by the router itself (:class:`RouterParallel`).

The combine (each token's routing-weighted sum over its selected experts) is linear, so it is
applied to the partial sums and the block output is reduced once, after the combine
(:func:`moe_block_style`): the same reduction as a dense MLP's ``down_proj``. The combine itself
costs no communication: each rank weights its partial expert outputs with the routing weights
it computed.

Communication per MoE layer: forward one all-gather of the block input (sequence parallel; none
without) and one reduce-scatter of the block output (all-reduce without SP), as a dense MLP;
backward the same two, plus one all-reduce of the router weight gradient
(``num_experts · hidden`` elements).

The router's load-balancing loss (``output_router_logits``) is computed from the router logits
every rank holds in full, so every rank computes it whole; its gradient reaches the router
divided by tp (:class:`_DivideGrad`), so that the all-reduce that sums the routing gradients'
partial sums counts it once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInputOutput

from lightning_tp.errors import ModelShapeError, PlanError
from lightning_tp.parallel.styles import replicate_parameters

__all__ = ["ExpertsParallel", "RouterParallel", "moe_block_style"]


def moe_block_style(between: Any) -> ParallelStyle:
    """The MoE block (``mlp``): its input gathered to ``Replicate()`` once (an all-gather under SP;
    the input gradient, a partial sum from the router and the experts, reduce-scattered once in
    backward), its output, the experts' combined partial sums, reduced once to ``between``."""
    return PrepareModuleInputOutput(
        input_layouts=(between,), desired_input_layouts=(Replicate(),),
        output_layouts=(Partial(),), desired_output_layouts=(between,), use_local_output=True)


class _SumGrad(torch.autograd.Function):
    """Identity forward; backward: the gradient summed over the TP group (one all-reduce)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _DivideGrad(torch.autograd.Function):
    """Identity forward; backward: the gradient divided by ``n`` (a gradient every rank holds in
    full, turned into one share of a sum over the ranks)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, n: int) -> Tensor:
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad / ctx.n, None


class _LocalView:
    """``module`` with some parameters replaced by local tensors, for calling the module's own
    forward function on them (no hooks run: the call is not the module's ``__call__``)."""

    def __init__(self, module: nn.Module, **tensors: Tensor) -> None:
        self.__dict__.update(tensors)
        self.module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def _local_input(x: Any, what: str) -> Tensor:
    """The replicated block input as a local tensor whose gradient is this rank's partial sum."""
    if not isinstance(x, DTensor):
        raise PlanError(f"The MoE {what} needs the block input as a replicated DTensor (the"
                        " PrepareModuleInputOutput of moe_block_style on the mlp block).")
    return x.to_local(grad_placements=(Partial(),))


class _TPRouter:
    """Forward of a router under :class:`RouterParallel`."""

    base: type
    tp_mesh: Any

    def forward(self, hidden_states: Any) -> Any:
        x = _local_input(hidden_states, "router")
        weight = _SumGrad.apply(self.weight.to_local(), self.tp_mesh.get_group())
        logits, *rest = self.base.forward(_LocalView(self, weight=weight), x)
        # The logits leave the block only for the load-balancing loss, which every rank computes
        # whole: its gradient is divided by tp so that the weight's all-reduce counts it once.
        return (_DivideGrad.apply(logits, self.tp_mesh.size()), *rest)


class _TPExperts:
    """Forward of an experts module under :class:`ExpertsParallel`: this rank's slice of every
    expert, the routing-weighted combine of the partial outputs (reduced by the block)."""

    base: type

    def forward(self, hidden_states: Any, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        x = _local_input(hidden_states, "experts")
        gate_up = self.gate_up_proj.to_local()  # (E, 2, I/tp, H): this rank's gate rows, up rows
        local = _LocalView(self, gate_up_proj=gate_up.flatten(1, 2),
                           down_proj=self.down_proj.to_local())
        return self.base.forward(local, x, top_k_index, top_k_weights)


@functools.cache
def _subclass(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin``'s forward, which calls ``cls.forward`` (``base``) on local tensors."""
    return type(f"TP{cls.__name__}", (mixin, cls), {"__module__": __name__, "base": cls})


class RouterParallel(ParallelStyle):
    """The router (``mlp.gate``): weight ``Replicate()``; run on the whole block input on every
    rank (the same routing everywhere); its weight gradient all-reduced over the TP group (one
    all-reduce of ``num_experts · hidden`` elements per layer, backward)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not isinstance(getattr(module, "weight", None), nn.Parameter) or any(
                n != "weight" for n, _ in module.named_parameters(recurse=False)):
            raise PlanError(f"RouterParallel expects a router with one `weight` parameter (as"
                            f" transformers' TopKRouter), got {type(module).__name__}.")
        replicate_parameters("", module, device_mesh)
        module.__class__ = _subclass(_TPRouter, type(module))
        module.tp_mesh = device_mesh
        return module


class ExpertsParallel(ParallelStyle):
    """Fused experts (``mlp.experts``): ``gate_up_proj`` split along each expert's intermediate
    dimension (gate slice ``r`` and up slice ``r`` on rank ``r``), ``down_proj`` along its input
    columns. No communication of its own: the outputs are partial sums, combined locally and
    reduced once by the block (:func:`moe_block_style`)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp = device_mesh.size()
        gate_up, down = _expert_weights(module)
        experts, fused, hidden = gate_up.shape
        intermediate = fused // 2
        if intermediate % tp != 0:
            raise ModelShapeError(
                f"{type(module).__name__}: the expert intermediate size {intermediate}"
                f" (gate_up_proj {tuple(gate_up.shape)}) is not divisible by"
                f" tensor_parallel_size={tp}. Fix: choose a tensor_parallel_size that divides"
                f" {intermediate}.")
        # Kept as (E, 2, I, H) split on I, a plain Shard(2) that distributed checkpoints save and
        # reshard (viewed as the model's (E, 2I, H) it would be a strided shard, which they
        # refuse); the forward views the local block back. `lightning-tp export` writes the
        # model's shape, and a state dict of that shape loads (the pre-hook below).
        split = distribute_tensor(gate_up.detach().view(experts, 2, intermediate, hidden),
                                  device_mesh, [Shard(2)])
        module.gate_up_proj = nn.Parameter(split, gate_up.requires_grad)
        module._register_load_state_dict_pre_hook(_unfuse_gate_up)
        module.down_proj = nn.Parameter(distribute_tensor(down.detach(), device_mesh, [Shard(2)]),
                                        down.requires_grad)
        module.__class__ = _subclass(_TPExperts, type(module))
        return module

    def shard_dim(self, name: str, param_ndim: int) -> int | None:
        """The dimension of the model's own (unsharded) parameter ``name`` split over tp: the
        intermediate one, ``2I`` of ``gate_up_proj`` (E, 2I, H) and ``I`` of ``down_proj``
        (E, H, I) (for the planner's and ``describe_plan``'s shapes)."""
        return {"gate_up_proj": 1, "down_proj": 2}.get(name)

    def model_layout(self, name: str, full: Tensor) -> Tensor:
        """The full tensor ``name`` in the model's own shape: ``gate_up_proj`` (E, 2, I, H) as
        (E, 2I, H); ``down_proj`` unchanged."""
        return full.flatten(1, 2) if name == "gate_up_proj" and full.ndim == 4 else full


def _unfuse_gate_up(state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Accept the model's own (E, 2I, H) ``gate_up_proj`` in a state dict, as (E, 2, I, H)."""
    value = state_dict.get(prefix + "gate_up_proj")
    if isinstance(value, Tensor) and value.ndim == 3:
        state_dict[prefix + "gate_up_proj"] = value.unflatten(1, (2, value.shape[1] // 2))


def _expert_weights(module: nn.Module) -> tuple[Tensor, Tensor]:
    """``(gate_up_proj, down_proj)`` of a fused experts module of the layout this style splits;
    :class:`PlanError` naming what differs otherwise."""
    names = sorted(n for n, _ in module.named_parameters(recurse=False))
    layout = {a: getattr(module, a, d) for a, d in (("has_gate", True), ("has_bias", False),
                                                    ("is_transposed", False),
                                                    ("is_concatenated", True))}
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    expected = {"has_gate": True, "has_bias": False, "is_transposed": False,
                "is_concatenated": True}
    if (names != ["down_proj", "gate_up_proj"] or layout != expected
            or not isinstance(gate_up, Tensor) or gate_up.ndim != 3 or gate_up.shape[1] % 2
            or not isinstance(down, Tensor)
            or tuple(down.shape) != (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2)):
        raise PlanError(
            f"ExpertsParallel splits fused experts with parameters gate_up_proj (E, 2I, H), gate"
            f" rows then up rows, and down_proj (E, H, I), without bias; {type(module).__name__}"
            f" has {names} and {layout}. Pass `plan=` a dict with styles for its layout.")
    return gate_up, down
