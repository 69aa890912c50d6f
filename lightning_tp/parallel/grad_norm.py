"""Gradient norms and clipping across meshes: the norm one device would compute, however the
gradients are sharded (``torch.nn.utils.clip_grad_norm_`` stacks per-mesh norms and fails once
parameters live on different meshes)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["clip_grad_norm_", "clip_grad_value_", "total_grad_norm"]


def _local(grad: Tensor) -> Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


@torch.no_grad()
def total_grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients together, as one device would compute it, whatever meshes they
    live on.

    When every gradient is a DTensor without partial sums (the usual case after FSDP2), each rank
    adds up its own shards, divides by how many ranks hold the same values, and one all-reduce over
    the world gives every rank the identical total. Otherwise norms are computed per mesh with
    DTensor reductions and combined.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if dist.is_initialized() and all(
            isinstance(g, DTensor) and not any(p.is_partial() for p in g.placements)
            for g in grads):
        return _world_norm(grads, norm_type)
    groups: dict[Any, list[Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    return stacked.max() if math.isinf(norm_type) else torch.linalg.vector_norm(stacked, norm_type)


def _world_norm(grads: list[Any], norm_type: float) -> Tensor:
    world = dist.get_world_size()
    device = grads[0].to_local().device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        local = g.to_local().detach()
        if math.isinf(norm_type):
            total = torch.maximum(total, local.abs().max().double() if local.numel() else total)
            continue
        # ranks holding the same values: replicated mesh dims, and the world ranks outside this mesh
        copies = world // g.device_mesh.size()
        for dim, placement in enumerate(g.placements):
            if placement.is_replicate():
                copies *= g.device_mesh.size(dim)
        total += local.double().abs().pow(norm_type).sum() / copies
    dist.all_reduce(total, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM)
    result = total if math.isinf(norm_type) else total.pow(1.0 / norm_type)
    return result.to(grads[0].dtype)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0) -> Tensor:
    """Scale every gradient in place so that :func:`total_grad_norm` is at most ``max_norm``;
    returns the norm before clipping."""
    parameters = list(parameters)
    total = total_grad_norm(parameters, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            local = _local(p.grad)
            local.mul_(coef.to(local.device, local.dtype))
    return total


@torch.no_grad()
def clip_grad_value_(parameters: Iterable[Tensor], clip_value: float) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]``, shard by shard (element-wise,
    so no communication is needed)."""
    for p in parameters:
        if p.grad is not None:
            _local(p.grad).clamp_(-clip_value, clip_value)
