"""Mesh-aware gradient norm and clipping, single process (a 1-rank gloo group holds several meshes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_tp.parallel.grad_norm import clip_grad_norm_, total_grad_norm


@pytest.fixture
def meshes():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield (init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel")),
               init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",)))
    finally:
        dist.destroy_process_group()


def _params(meshes) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh2d, mesh1d = meshes
    g = torch.Generator().manual_seed(0)
    plain_grads = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 2, generator=g)]
    a = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh2d, [Shard(0), Replicate()]))
    b = nn.Parameter(distribute_tensor(torch.zeros(5), mesh1d, [Shard(0)]))
    c = nn.Parameter(torch.zeros(2, 2))
    a.grad = distribute_tensor(plain_grads[0], mesh2d, [Shard(0), Replicate()])
    b.grad = distribute_tensor(plain_grads[1], mesh1d, [Shard(0)])
    c.grad = plain_grads[2].clone()
    return [a, b, c], plain_grads


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_total_norm_across_meshes_equals_one_device(meshes, norm_type: float) -> None:
    params, plain = _params(meshes)
    expected = torch.linalg.vector_norm(_flat(plain), norm_type)
    torch.testing.assert_close(total_grad_norm(params, norm_type), expected)


def test_clip_scales_every_gradient_by_one_factor(meshes) -> None:
    from torch.distributed.tensor import DTensor

    params, plain = _params(meshes)
    norm = torch.linalg.vector_norm(_flat(plain))
    returned = clip_grad_norm_(params, max_norm=0.5)
    torch.testing.assert_close(returned, norm)  # the norm before clipping, as torch returns it
    clipped = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
    torch.testing.assert_close(torch.linalg.vector_norm(_flat(clipped)), torch.tensor(0.5), rtol=1e-5, atol=1e-5)
    for before, after in zip(plain, clipped, strict=True):
        torch.testing.assert_close(after, before * (0.5 / (norm + 1e-6)))


def test_clip_leaves_small_gradients_alone(meshes) -> None:
    params, plain = _params(meshes)
    clip_grad_norm_(params, max_norm=1e6)
    torch.testing.assert_close(params[2].grad, plain[2])


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_all_dtensor_gradients_take_the_single_all_reduce_path(meshes, norm_type: float) -> None:
    params, plain = _params(meshes)
    params = params[:2]  # both DTensors, no partial sums: one all-reduce over the world
    expected = torch.linalg.vector_norm(_flat(plain[:2]), norm_type)
    torch.testing.assert_close(total_grad_norm(params, norm_type), expected)
