"""Parallel styles the plans share besides torch's: parameters kept whole as ``Replicate()``
DTensors (:class:`ReplicateParallel`), a norm over each rank's sequence shard computed on plain
local tensors (:class:`SequenceParallelNorm`), and a norm over each rank's own heads
(:class:`HeadShardedNorm`).

All three keep the weights ``Replicate()`` DTensors (what FSDP, the optimizer and the checkpoints
see) but run the module's own forward on the local input and the weights' local tensors. The two
norm styles take them with ``to_local(grad_placements=(Partial(),))``: each rank's weight gradient
is a sum over its own tokens or heads, and stays a ``Partial`` DTensor that is summed over the TP
ranks where it is consumed (FSDP2's gradient reduction), as under DTensor dispatch. The ops are
the same local ops DTensor would run on each shard, so results are bit for bit those of running
the module on DTensors, without DTensor's sharding propagation per op (15 ops per norm forward and
backward, some 35 µs of Python each on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel

__all__ = ["HeadShardedNorm", "ReplicateParallel", "SequenceParallelNorm", "replicate_parameters",
           "run_on_local_weights"]


def replicate_parameters(_name: str, module: nn.Module, mesh: Any) -> None:
    """``distribute_module``'s partition function: every parameter of ``module`` a ``Replicate()``
    DTensor on ``mesh``."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))


class ReplicateParallel(ParallelStyle):
    """Keep a module's parameters whole on every TP rank, but as ``Replicate()`` DTensors.

    Costs no communication. It puts parameters that TP does not shard (norm weights when sequence
    parallelism is off) on the same mesh as the sharded ones, so after FSDP every parameter lives on
    one 2D mesh and foreach optimizers and norm computations see a single mesh. The module runs on
    plain tensors (:func:`run_on_local_weights`, gradients ``Replicate()``: every rank computes
    the same whole gradient from the same input, as DTensor's ``Replicate()`` ops would); a
    DTensor input is first made ``Replicate()``.
    """

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        for sub in module.modules():
            replicate_parameters("", sub, device_mesh)
        run_on_local_weights(module, _replicated_local, _local, grad_placements=(Replicate(),))
        return module


def _replicated_local(x: Any) -> Any:
    if isinstance(x, DTensor):
        return (x if all(p.is_replicate() for p in x.placements)
                else x.redistribute(placements=[Replicate()] * x.device_mesh.ndim)).to_local()
    return x


def run_on_local_weights(module: nn.Module, prepare: Callable[[Any], torch.Tensor],
                         finish: Callable[[torch.Tensor], Any],
                         grad_placements: tuple = (Partial(),)) -> None:
    """Make ``module``'s forward run on plain tensors: ``prepare`` turns the first input into the
    local tensor, each ``Replicate()`` DTensor parameter of ``module`` and its children is
    replaced by its local tensor for the call, with ``grad_placements`` for its gradient
    (``Partial()``: a per-rank partial sum), and ``finish`` turns the output back.

    The parameters are swapped in ``module._parameters`` between a forward pre-hook and a forward
    hook that runs even if the forward raises, as FSDP2 swaps its sharded and unsharded
    parameters, so any forward that reads ``self.weight`` (a custom autograd Function,
    ``F.layer_norm``, ``1 + self.weight``) sees a plain tensor; the registered parameters, the
    ``state_dict`` and the module's forward are untouched (hooks, not a closure over the module:
    a deep copy of the model runs its own weights).
    """

    def swap_in(mod: nn.Module, args: tuple) -> tuple:
        saved = [(sub, dict(sub._parameters)) for sub in mod.modules()]
        mod.__dict__[_SAVED] = saved
        for sub, params in saved:
            for name, param in params.items():
                if isinstance(param, DTensor):
                    sub._parameters[name] = param.to_local(grad_placements=grad_placements)
        return (prepare(args[0]), *args[1:])

    def swap_out(mod: nn.Module, _args: tuple, out: Any) -> Any:
        for sub, params in mod.__dict__.pop(_SAVED):
            sub._parameters.update(params)
        return out if out is None else finish(out)  # None: the forward raised

    module.register_forward_pre_hook(swap_in)
    module.register_forward_hook(swap_out, always_call=True)


_SAVED = "_lightning_tp_replicated_parameters"
"""The attribute holding a module's DTensor parameters while its forward runs on local tensors."""


class SequenceParallelNorm(SequenceParallel):
    """torch's ``SequenceParallel`` for a per-token norm, computed on the local sequence shard.

    Same layouts as its parent: the input is sequence-sharded (a plain tensor is taken as the
    shard; a DTensor is redistributed to ``Shard(sequence_dim)``), the weights are ``Replicate()``
    (from ones, as the parent assumes: ``from_local``, no broadcast), the output is a
    ``Shard(sequence_dim)`` DTensor, or the local shard with ``use_local_output=True``. Only the
    computation differs: the norm's own forward on plain tensors (:func:`run_on_local_weights`).
    Any module whose parameters act per token fits (RMSNorm, Gemma's ``(1 + weight)`` norm,
    LayerNorm with its bias); a module that mixes tokens would need the whole sequence and does
    not.
    """

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        self._replicate_module_fn("", module, device_mesh)
        sharding = self.sequence_sharding

        def prepare(x: Any) -> torch.Tensor:
            if isinstance(x, DTensor):
                return (x if x.placements == sharding else x.redistribute(placements=sharding)
                        ).to_local()
            if isinstance(x, torch.Tensor):
                return x
            raise TypeError(f"{type(module).__name__} under {type(self).__name__} expects a "
                            f"tensor input, got {type(x).__name__}")

        def finish(out: torch.Tensor) -> Any:
            return (out if self.use_local_output
                    else DTensor.from_local(out, device_mesh, sharding, run_check=False))

        run_on_local_weights(module, prepare, finish)
        return module


class HeadShardedNorm(ParallelStyle):
    """A norm over ``head_dim`` applied to a rank's own heads (Qwen3's ``q_norm``/``k_norm``).

    Its input is the local ``(bs, seqlen, n_local_heads, head_dim)`` projection, i.e.
    ``Shard(heads_dim)`` of the full heads; the weight is ``Replicate()`` so that its gradient, a
    partial sum over each rank's heads, is summed over the TP ranks (a plain weight would silently
    keep only the local heads' share). It runs on the local tensors
    (:func:`run_on_local_weights`): each rank's heads are plain tensors already.
    """

    heads_dim = 2
    """The input's heads dimension (a subclass for a norm applied after the heads are
    transposed forward sets 1): its layout, which the local computation does not need."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        replicate_parameters("", module, device_mesh)
        run_on_local_weights(module, _local, _local)
        return module


def _local(x: Any) -> Any:
    return x.to_local() if isinstance(x, DTensor) else x
