"""``Llama.init_weights(seed)``: the same values whether the model is whole on one device or sharded as DTensors.

Single process. Each rank of a fake world (``tests/launching.py``; its collectives move no data, and seeded init
needs none) builds the model on the meta device, shards it, materialises it and initialises it with the seed; its
local shards must equal the slices of the single-device init that the placements give it, computed here with
``torch.chunk`` as DTensor defines ``Shard``, one mesh dimension after the other. On CUDA this is what the GPU tier's
meta-init check needs (``tests/gpu/test_gpu_stack.py``); on the CPU the same code runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from launching import fake_world
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lightning_tp.models import Llama, get_config
from lightning_tp.models.llama import _parameter_seed

SEED = 11
# One layer; a vocabulary of 6 leaves the 4th of 4 ranks an empty Shard(0) (chunks of 2), an intermediate size of 90
# gives uneven shards (23, 23, 23, 21 of 4; 45, 45 then 23, 22 on a 2 x 2 mesh).
ODD = get_config("debug", vocab_size=6, intermediate_size=90, num_hidden_layers=1)


@contextlib.contextmanager
def _rank(rank: int, world: int) -> Iterator[None]:
    """``fake_world``, with DTensor's sharding-propagation caches emptied first: their entries hold the device mesh of
    the rank simulated before (meshes of equal shape compare equal), whose coordinate would be this rank's."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    with fake_world(rank, world):
        yield


def _single_device(config: Any = ODD, seed: int = SEED) -> dict[str, torch.Tensor]:
    model = Llama(config)
    model.init_weights(seed=seed)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _expected_shard(full: torch.Tensor, coordinate: Sequence[int], mesh_shape: Sequence[int],
                    placements: Sequence[Any]) -> torch.Tensor:
    """The part of ``full`` a rank at ``coordinate`` holds: each mesh dimension in turn splits what the previous left,
    ``torch.chunk`` on the sharded dim (a rank past the last chunk holds an empty slice)."""
    local = full
    for index, size, placement in zip(coordinate, mesh_shape, placements, strict=True):
        if isinstance(placement, Shard):
            chunks = local.chunk(size, dim=placement.dim)
            local = chunks[index] if index < len(chunks) else local.narrow(placement.dim, 0, 0)
    return local


def _sharded_locals(rank: int, mesh_shape: tuple[int, ...],
                    placements: list[Any]) -> tuple[list[int], dict[str, torch.Tensor]]:
    """On ``rank`` of a fake world: every linear and embedding weight distributed with ``placements`` on the meta
    device, materialised, then ``init_weights(SEED)``; the rank's mesh coordinate and its local shards by name."""
    with _rank(rank, int(torch.tensor(mesh_shape).prod())):
        mesh = init_device_mesh("cpu", mesh_shape)
        with torch.device("meta"):
            model = Llama(ODD)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight = nn.Parameter(distribute_tensor(module.weight, mesh, placements, src_data_rank=None))
        model.to_empty(device="cpu")
        model.init_weights(seed=SEED)
        sharded = {name: p.to_local().clone() for name, p in model.named_parameters() if isinstance(p, DTensor)}
        return mesh.get_coordinate(), sharded


@pytest.mark.parametrize(("mesh_shape", "placements", "uneven"), [
    ((4,), [Shard(0)], True),  # 90 rows: 23, 23, 23, 21; 6 rows: 2, 2, 2, 0
    ((4,), [Shard(1)], True),  # down_proj's 90 columns
    ((3,), [Shard(0)], True),  # 64 rows: 22, 22, 20
    ((4,), [Replicate()], False),
    ((2, 2), [Shard(0), Shard(1)], False),
    ((2, 2), [Shard(0), Shard(0)], True),  # 90 rows: 45 then 23, 22; 6 rows: 3 then 2, 1
    ((2, 2), [Replicate(), Shard(0)], False),
    ((2, 2), [Shard(1), Replicate()], False),
], ids=["shard0", "shard1", "uneven-of-3", "replicate", "2d-shard0-shard1", "2d-shard0-shard0",
        "2d-replicate-shard0", "2d-shard1-replicate"])
def test_every_ranks_shards_are_slices_of_the_single_device_init(mesh_shape: tuple[int, ...], placements: list[Any],
                                                                 uneven: bool) -> None:
    reference = _single_device()
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for rank in range(int(torch.tensor(mesh_shape).prod())):
        coordinate, shards = _sharded_locals(rank, mesh_shape, placements)
        assert set(shards) == {n for n in reference if "norm" not in n}, "every weight is a DTensor"
        for name, local in shards.items():
            expected = _expected_shard(reference[name], coordinate, mesh_shape, placements)
            assert local.shape == expected.shape, (rank, name)
            assert torch.equal(local, expected), f"rank {rank} ({coordinate}): {name} differs from its slice"
            shapes.setdefault(name, set()).add(tuple(local.shape))
    assert any(len(s) > 1 for s in shapes.values()) == uneven, shapes
    if placements == [Shard(0)] and mesh_shape == (4,):
        assert (0, ODD.hidden_size) in shapes["lm_head.weight"], "6 rows in chunks of 2 leave rank 3 none"


@pytest.mark.parametrize(("tp", "dp"), [(2, 2), (4, 1), (1, 3)])
def test_the_strategys_gpu_path_tensor_parallel_then_fsdp2_then_init_equals_single_device_init(tp: int,
                                                                                                dp: int) -> None:
    """What the strategy does on a GPU (``parallelize``: TP, FSDP2 on the meta device, then ``materialize`` calls
    ``init_weights(seed)``), run here on the CPU: FSDP2 shards each TP shard on dim 0 over the data-parallel ranks
    (``_StridedShard`` where TP shards dim 0 too), so a rank's local tensor is TP's slice, then FSDP2's."""
    from lightning_tp.parallel.fsdp import apply_fsdp
    from lightning_tp.parallel.parallelize import apply_tensor_parallel, materialize
    from lightning_tp.parallel.plans import resolve_plan

    config = get_config("debug", intermediate_size=90, vocab_size=101)
    reference = _single_device(config)
    for rank in range(tp * dp):
        with _rank(rank, tp * dp):
            mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
            with torch.device("meta"):
                model = Llama(config)
            plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
            if tp > 1:
                apply_tensor_parallel(model, plan, mesh["tensor_parallel"])
            placements_after_tp = {n: getattr(p, "placements", (Replicate(),)) for n, p in model.named_parameters()}
            apply_fsdp(model, plan, mesh["data_parallel"])
            materialize(model, plan, torch.device("cpu"), seed=SEED)
            d, t = mesh.get_coordinate()
            for name, param in model.named_parameters():
                assert isinstance(param, DTensor), name
                tp_slice = _expected_shard(reference[name], [t], [tp], placements_after_tp[name])
                expected = _expected_shard(tp_slice, [d], [dp], [Shard(0)])
                assert torch.equal(param.to_local(), expected), f"rank {rank} ({d}, {t}): {name}"


def test_the_same_seed_gives_the_same_values_and_the_global_generator_is_left_alone() -> None:
    model = Llama(ODD)  # its constructor's init draws from the global generator; init_weights(seed) must not
    state = torch.get_rng_state()
    model.init_weights(seed=SEED)
    assert torch.equal(torch.get_rng_state(), state), "a seeded init draws nothing from the global generator"
    first, second = _single_device(), _single_device()
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    other = _single_device(seed=SEED + 1)
    drawn = [n for n in first if "norm" not in n]
    assert not any(torch.equal(first[n], other[n]) for n in drawn), "another seed, other values"


def test_different_names_give_different_values() -> None:
    """Weights of the same shape (every layer's q_proj and o_proj; k_proj and v_proj) draw from their own streams."""
    weights = _single_device(get_config("debug", num_hidden_layers=3))
    same_shape: dict[tuple[int, ...], list[str]] = {}
    for name, weight in weights.items():
        if "norm" not in name:
            same_shape.setdefault(tuple(weight.shape), []).append(name)
    pairs = [(a, b) for names in same_shape.values() for i, a in enumerate(names) for b in names[i + 1:]]
    assert len(pairs) >= 15  # 6 of (64, 64) give 15 pairs alone
    assert not [(a, b) for a, b in pairs if torch.equal(weights[a], weights[b])]
    # the draws are no shifted copies of one stream either: no first element reappears in another weight
    firsts = {name: w.flatten()[0].item() for name, w in weights.items() if "norm" not in name}
    assert len(set(firsts.values())) == len(firsts)


def test_without_a_seed_the_global_generator_draws() -> None:
    values = []
    for _ in range(2):
        torch.manual_seed(5)
        model = Llama(ODD)
        model.init_weights()
        values.append(model.lm_head.weight.detach().clone())
    assert torch.equal(values[0], values[1])
    assert not torch.equal(values[0], _single_device()["lm_head.weight"])


def _salted_hash(text: str, salt: str) -> int:
    """``hash(text)`` in a Python started with ``PYTHONHASHSEED=salt`` (a bare interpreter: no imports)."""
    return int(subprocess.run([sys.executable, "-S", "-c", f"print(hash({text!r}))"],
                              env={**os.environ, "PYTHONHASHSEED": salt}, capture_output=True, text=True,
                              check=True).stdout)


def test_the_per_parameter_seed_does_not_depend_on_pythons_string_hash_salt() -> None:
    """``hash()`` of a string changes with ``PYTHONHASHSEED``; the per-parameter seed must not (every rank and every
    run must draw the same)."""
    name = "model.layers.0.self_attn.q_proj.weight"
    code = (f"from lightning_tp.models.llama import _parameter_seed; print(hash({name!r}));"
            f" print(_parameter_seed({SEED}, {name!r}))")
    # one other process, with a salt other than this one's (one launch: each imports Lightning, ~7 s)
    salt = "1" if hash(name) != _salted_hash(name, "1") else "2"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": salt},
                         capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) != hash(name)  # the other process's hash() of the name differs ...
    assert int(out[1]) == _parameter_seed(SEED, name)  # ... its seed does not
    assert 0 <= _parameter_seed(SEED, name) < 2**63
    assert _parameter_seed(SEED, name) != _parameter_seed(SEED + 1, name)
