"""2D tensor parallelism's bad input, refused in the launching process: malformed grids, grids that are not the TP
size or do not fit the devices, the modes a grid does not combine with, and models the 2D plan cannot split. The
``no_spawn`` fixture makes a check that wrongly passes show up as ``SpawnBlocked``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from launching import SpawnBlocked, cpu_trainer
from preflight_models import ModelModule, meta_llama
from torch import nn

from lightning_tp import MeshConfigError, PlanError, TensorParallelStrategy
from lightning_tp.config import ParallelConfig, split_grid
from lightning_tp.errors import SequenceLengthError
from lightning_tp.models import Llama, get_config
from lightning_tp.parallel.grid import grid_llama_plan
from lightning_tp.parallel.plans import resolve_plan
from lightning_tp.parallel.shapes import install_sequence_check

pytestmark = pytest.mark.usefixtures("no_spawn")


@pytest.mark.parametrize("size, expected", [
    ((2, 4), (8, (2, 4))), ([4, 2], (8, (4, 2))), ((2, 1), (2, (2, 1))), (4, (4, None)), ("auto", ("auto", None)),
])
def test_a_pair_is_a_grid_and_an_int_is_1d(size: Any, expected: tuple) -> None:
    assert split_grid(size) == expected


@pytest.mark.parametrize("size", [(2,), (2, 2, 2), (2, 0), ("2", 2), (2.0, 2), (True, 2)])
def test_malformed_grid_is_named_with_the_fix(size: Any) -> None:
    with pytest.raises(MeshConfigError) as info:
        TensorParallelStrategy(tensor_parallel_size=size)
    message = str(info.value)
    assert repr(tuple(size)) in message and "two positive ints" in message and "tensor_parallel_size=(2, 2)" in message


@pytest.mark.parametrize("option, value", [
    ("sequence_parallel", False), ("save_sharded_inputs", True), ("compile", True), ("float8", True),
    ("activation_checkpointing", "selective"),
])
def test_modes_a_grid_does_not_combine_with_are_refused_by_name(option: str, value: Any) -> None:
    with pytest.raises(MeshConfigError) as info:
        TensorParallelStrategy(tensor_parallel_size=(2, 2), **{option: value})
    message = str(info.value)
    assert f"{option}={value!r}" in message and "(2, 2)" in message and "int tensor_parallel_size" in message
    TensorParallelStrategy(tensor_parallel_size=4, **{option: value} if option != "save_sharded_inputs" else {})


def test_modes_a_grid_combines_with_are_accepted() -> None:
    strategy = TensorParallelStrategy(tensor_parallel_size=(2, 2), activation_checkpointing="full", loss_parallel=False,
                                      fsdp=False, data_parallel_size=1)
    assert strategy.grid == (2, 2) and strategy.parallel.tensor_parallel_size == 4
    assert strategy.sequence_shards == 2  # a sequence is split over the grid's rows only


def test_grid_product_must_be_the_tp_size() -> None:
    with pytest.raises(MeshConfigError, match=r"`tensor_parallel_size` 3 is not the grid's 2×2 = 4"):
        ParallelConfig(tensor_parallel_size=3, grid=(2, 2))


def test_grid_that_does_not_fit_the_devices_fails_at_trainer_construction(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError, match="tensor_parallel_size"):
        cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(tensor_parallel_size=(2, 2)))
    trainer = cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=(2, 1)))
    assert (trainer.strategy._data_parallel_size, trainer.strategy._tensor_parallel_size) == (2, 2)


@pytest.mark.parametrize("overrides, grid, words", [
    ({"num_key_value_heads": 2}, (2, 2), ["num_key_value_heads=2", "r·c = 4"]),
    ({}, (4, 2), ["num_key_value_heads=4", "r·c = 8"]),
    ({"hidden_size": 66, "head_dim": 8}, (1, 4), ["hidden_size=66", "c = 4"]),
    ({"intermediate_size": 190}, (2, 2), ["intermediate_size=190", "r·c = 4"]),
])
def test_model_the_grid_cannot_split_is_refused_before_spawn(tmp_path: Path, overrides: dict, grid: tuple,
                                                             words: list[str]) -> None:
    devices = grid[0] * grid[1]
    trainer = cpu_trainer(tmp_path, devices=devices, strategy=TensorParallelStrategy(tensor_parallel_size=grid))
    with pytest.raises(PlanError) as info:
        trainer.fit(ModelModule(meta_llama(**overrides)))
    assert all(w in str(info.value) for w in words), str(info.value)
    assert f"tensor_parallel_size={grid}" in str(info.value)


def test_shardable_model_passes_the_grid_preflight_and_reaches_spawn(tmp_path: Path) -> None:
    """Control for the refusals above."""
    trainer = cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=(2, 2)))
    with pytest.raises(SpawnBlocked):
        trainer.fit(ModelModule(meta_llama()))


def test_a_plan_of_ones_own_is_refused_with_a_grid() -> None:
    with pytest.raises(PlanError, match="applies its own plan; got plan='llama_per_projection'"):
        resolve_plan(meta_llama(), "llama_per_projection", sequence_parallel=True, loss_parallel=True, grid=(2, 2))


def test_family_without_a_grid_plan_is_refused() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=4, head_dim=8))
    with pytest.raises(PlanError, match="Llama, Mistral and Qwen2 models only; Qwen3ForCausalLM"):
        resolve_plan(qwen3, "auto", sequence_parallel=True, loss_parallel=True, grid=(2, 2))


def test_peft_adapters_are_refused_with_a_grid() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Llama(get_config("debug")), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(PlanError, match="does not shard PEFT adapters"):
        resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True, grid=(2, 2))


def test_grid_plan_covers_every_decoder_module_and_resolves_on_the_model() -> None:
    model = meta_llama()
    resolved = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True, grid=(2, 2))
    assert resolved.grid == (2, 2) and resolved.blocks == ["model.layers.0", "model.layers.1"]
    projections = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert projections <= set(resolved.styles)  # every projection split, lm_head included
    assert set(grid_llama_plan()) >= {"model.embed_tokens", "lm_head", "model.norm"}


def test_sequence_check_names_the_grid_rows() -> None:
    model = Llama(get_config("debug"))
    resolved = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True, grid=(2, 2))
    install_sequence_check(model, resolved, 2, "the grid's rows (tensor_parallel_size=(2, 2))")
    with pytest.raises(SequenceLengthError, match=r"15 is not divisible by the grid's rows") as info:
        model(torch.zeros(1, 15, dtype=torch.long))
    assert "int tensor_parallel_size (1D)" in str(info.value)


@pytest.mark.parametrize("grid, q, o, down, norm", [
    ((2, 2), (32, 32), (32, 32), (32, 96), (32,)),
    ((4, 1), (16, 64), (64, 16), (64, 48), (64,)),
    ((1, 4), (64, 16), (16, 64), (16, 192), (16,)),
])
def test_describe_plan_gives_each_devices_block_of_the_grid(grid: tuple, q: tuple, o: tuple, down: tuple,
                                                            norm: tuple) -> None:
    """Per-device shapes without a process group: q/k/v and gate/up split (out over rows, in over columns), o_proj
    and down_proj the other way round, norms over the columns, embedding and lm_head by vocabulary over all r·c."""
    from lightning_tp.parallel.plans import describe_plan

    model = meta_llama()
    rows = {r["module"]: r["params"] for r in describe_plan(model, resolve_plan(
        model, "auto", sequence_parallel=True, loss_parallel=True, grid=grid), grid[0] * grid[1])}
    assert rows["model.layers.0.self_attn.q_proj"]["weight"] == ((64, 64), q)
    assert rows["model.layers.1.self_attn.o_proj"]["weight"] == ((64, 64), o)
    assert rows["model.layers.0.mlp.down_proj"]["weight"] == ((64, 192), down)
    assert rows["model.layers.0.post_attention_layernorm"]["weight"] == ((64,), norm)
    assert rows["model.embed_tokens"]["weight"] == rows["lm_head"]["weight"] == ((512, 64), (128, 64))


def test_hydra_list_is_a_grid() -> None:
    from omegaconf import OmegaConf

    assert split_grid(OmegaConf.create({"tp": [2, 4]}).tp) == (8, (2, 4))
