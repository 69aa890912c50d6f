"""Parallel styles the plans share besides torch's: parameters kept whole as ``Replicate()``
DTensors (:class:`ReplicateParallel`), and a norm over each rank's own heads
(:class:`HeadShardedNorm`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

__all__ = ["HeadShardedNorm", "ReplicateParallel", "replicate_parameters"]


def replicate_parameters(_name: str, module: nn.Module, mesh: Any) -> None:
    """``distribute_module``'s partition function: every parameter of ``module`` a ``Replicate()``
    DTensor on ``mesh``."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))


class ReplicateParallel(ParallelStyle):
    """Keep a module's parameters whole on every TP rank, but as ``Replicate()`` DTensors.

    Costs no communication. It puts parameters that TP does not shard (norm weights when sequence
    parallelism is off) on the same mesh as the sharded ones, so after FSDP every parameter lives on
    one 2D mesh and foreach optimizers and norm computations see a single mesh.
    """

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import DTensor

        def inputs(_mod: nn.Module, args: tuple, mesh: Any) -> tuple:
            return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                         if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a
                         for a in args)

        def outputs(_mod: nn.Module, out: Any, _mesh: Any) -> Any:
            return out.to_local() if isinstance(out, DTensor) else out

        return distribute_module(module, device_mesh, replicate_parameters, inputs, outputs)


class HeadShardedNorm(ParallelStyle):
    """A norm over ``head_dim`` applied to a rank's own heads (Qwen3's ``q_norm``/``k_norm``).

    Its input is the local ``(bs, seqlen, n_local_heads, head_dim)`` projection, i.e.
    ``Shard(heads_dim)`` of the full heads; the weight is ``Replicate()`` so that its gradient, a
    partial sum over each rank's heads, is summed over the TP ranks (a plain weight would silently
    keep only the local heads' share).
    """

    heads_dim = 2
    """The input's heads dimension (a subclass for a norm applied after the heads are
    transposed forward sets 1)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import DTensor

        placement = [Shard(self.heads_dim)]

        def inputs(_mod: nn.Module, args: tuple, mesh: Any) -> tuple:
            return (DTensor.from_local(args[0], mesh, placement, run_check=False), *args[1:])

        def outputs(_mod: nn.Module, out: Any, _mesh: Any) -> Any:
            return out.to_local()

        return distribute_module(module, device_mesh, replicate_parameters, inputs, outputs)
