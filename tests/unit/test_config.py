"""``lightning_tp.config.ParallelConfig`` is the one owner of the parallel sizes and modes: the strategy's
arguments, the recipes' Hydra schema and the planner all follow it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from lightning_tp import TensorParallelStrategy
from lightning_tp.config import ParallelConfig
from lightning_tp.errors import MeshConfigError
from lightning_tp.recipes.config import StrategyConfig


def test_every_field_is_a_strategy_argument_with_the_same_default() -> None:
    """Except ``grid``, which the strategy derives from ``tensor_parallel_size=(r, c)`` (below)."""
    parameters = inspect.signature(TensorParallelStrategy.__init__).parameters
    for f in dataclasses.fields(ParallelConfig):
        if f.name == "grid":
            continue
        assert f.name in parameters, f"TensorParallelStrategy has no argument {f.name}"
        assert parameters[f.name].default == f.default, f.name


def test_a_pair_of_sizes_is_the_grid_field() -> None:
    strategy = TensorParallelStrategy(tensor_parallel_size=(4, 2))
    assert strategy.parallel == ParallelConfig(tensor_parallel_size=8, grid=(4, 2))
    assert TensorParallelStrategy(tensor_parallel_size=8).parallel.grid is None


def test_the_hydra_schema_has_every_strategy_argument() -> None:
    arguments = set(inspect.signature(TensorParallelStrategy.__init__).parameters) - {"self"}
    assert arguments <= {f.name for f in dataclasses.fields(StrategyConfig)}


def test_the_strategy_reads_its_modes_from_its_configuration() -> None:
    strategy = TensorParallelStrategy(tensor_parallel_size=2, activation_checkpointing="full", fsdp=True)
    assert strategy.parallel == ParallelConfig(tensor_parallel_size=2, activation_checkpointing="full")
    assert strategy.activation_checkpointing == "full" and strategy.fsdp is True


@pytest.mark.parametrize(("fields", "match"), [
    ({"tensor_parallel_size": 0}, "`tensor_parallel_size` must be 'auto' or a positive int, got 0"),
    ({"compile": "yes"}, "`compile` must be a bool, got 'yes'"),
    ({"activation_checkpointing": "most"}, "one of 'none', 'full', 'selective', got 'most'"),
    ({"async_tp": True}, "`async_tp=True` needs `compile=True`"),
    ({"fsdp": False, "data_parallel_size": 2}, "`fsdp=False` needs `data_parallel_size=1`"),
])
def test_invalid_values_are_refused_with_the_fix(fields: dict, match: str) -> None:
    with pytest.raises(MeshConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig(**fields)


@pytest.mark.parametrize(("tp", "dp", "world", "nodes", "expected"), [
    ("auto", "auto", 8, 1, (1, 8)), ("auto", "auto", 16, 2, (2, 8)), (2, "auto", 8, 1, (4, 2)),
    ("auto", 4, 8, 1, (4, 2)), (8, 2, 16, 2, (2, 8)),
])
def test_resolve(tp: object, dp: object, world: int, nodes: int, expected: tuple[int, int]) -> None:
    assert ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp).resolve(world, nodes) == expected


@pytest.mark.parametrize(("tp", "dp"), [(3, "auto"), (2, 2), ("auto", 3)])
def test_resolve_refuses_sizes_that_do_not_fit(tp: object, dp: object) -> None:
    with pytest.raises(MeshConfigError, match="multiplied should equal the world size 8"):
        ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp).resolve(8, 1)
