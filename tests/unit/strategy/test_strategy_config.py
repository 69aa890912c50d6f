"""Single-process tests of :class:`TensorParallelStrategy` configuration: argument checks, mesh sizes resolved at
``Trainer`` construction, registered names, and the preflight that runs in the launching process.

No test here may start a process. The ``no_spawn`` fixture (``tests/conftest.py``, used by every test here) replaces
Lightning's child-process launch with an error, so a check that wrongly passes shows up as ``SpawnBlocked`` instead
of a hung or duplicated pytest run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from launching import SpawnBlocked, cpu_trainer
from lightning.pytorch.strategies import StrategyRegistry
from preflight_models import ModelModule, meta_llama
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor.parallel import ColwiseParallel

import lightning_tp
from lightning_tp import LightningTPError, MeshConfigError, ModelShapeError, PlanError, TensorParallelStrategy
from lightning_tp.launch.preflight import check_model
from lightning_tp.models import Llama, get_config
from lightning_tp.parallel.shapes import install_sequence_check

pytestmark = pytest.mark.usefixtures("no_spawn")  # tests/conftest.py: starting the ranks raises SpawnBlocked


# ---------------------------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"tensor_parallel_size": 0}, ["tensor_parallel_size", "0"]),
        ({"tensor_parallel_size": "x"}, ["tensor_parallel_size", "'x'"]),
        ({"tensor_parallel_size": True}, ["tensor_parallel_size"]),
        ({"data_parallel_size": -2}, ["data_parallel_size", "-2"]),
        ({"data_parallel_size": 2.0}, ["data_parallel_size"]),
        ({"sequence_parallel": "yes"}, ["sequence_parallel", "'yes'"]),
        ({"loss_parallel": 1}, ["loss_parallel"]),
        ({"plan": 42}, ["plan", "42"]),
        ({"fsdp": False, "data_parallel_size": 2}, ["fsdp=False", "data_parallel_size"]),
        ({"activation_checkpointing": "partial"}, ["activation_checkpointing", "'partial'", "'selective'"]),
        ({"compile": "yes"}, ["compile", "'yes'"]),
        ({"async_tp": True}, ["async_tp=True", "compile=True"]),
        ({"float8": 1}, ["float8"]),
        ({"timeout": -5}, ["timeout", "positive number of seconds", "timeout=600"]),
        ({"timeout": "10m"}, ["timeout", "'10m'"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]!r}" for k in v) if isinstance(v, dict) else "",
)
def test_constructor_rejects_bad_arguments(kwargs: dict, names: list[str]) -> None:
    with pytest.raises(MeshConfigError) as info:
        TensorParallelStrategy(**kwargs)
    for name in names:
        assert name in str(info.value)
    assert isinstance(info.value, LightningTPError) and isinstance(info.value, ValueError)


def test_constructor_reports_every_problem_at_once() -> None:
    with pytest.raises(MeshConfigError) as info:
        TensorParallelStrategy(tensor_parallel_size=0, sequence_parallel="yes", plan=42)
    for name in ("tensor_parallel_size", "sequence_parallel", "plan"):
        assert f"`{name}`" in str(info.value)


def test_constructor_accepts_valid_arguments() -> None:
    strategy = TensorParallelStrategy(tensor_parallel_size=4, data_parallel_size="auto", plan={"lm_head": None},
                                      sequence_parallel=False, loss_parallel=False, fsdp=False)
    assert strategy.sequence_parallel is False and strategy.loss_parallel is False and strategy.fsdp is False
    assert strategy._tensor_parallel_size == 4 and strategy._data_parallel_size == "auto"
    TensorParallelStrategy(plan="llama")
    TensorParallelStrategy(plan=lambda **_: {})
    TensorParallelStrategy(fsdp=False, data_parallel_size=1)


# ---------------------------------------------------------------------------------------------- sizes at Trainer()


def test_tp_not_dividing_devices_fails_at_trainer_construction(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError) as info:
        cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=3))
    message = str(info.value)
    assert "tensor_parallel_size (3)" in message and "world size 4" in message


def test_dp_times_tp_not_world_fails_at_trainer_construction(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError) as info:
        cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=2, data_parallel_size=3))
    message = str(info.value)
    assert "data_parallel_size (3)" in message and "tensor_parallel_size (2)" in message and "world size 4" in message


def test_fsdp_false_with_data_parallel_replicas_fails(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError, match="fsdp=False") as info:
        cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=2, fsdp=False))
    assert "2" in str(info.value)
    # the same strategy is fine when TP spans every device
    trainer = cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=4, fsdp=False))
    assert (trainer.strategy._data_parallel_size, trainer.strategy._tensor_parallel_size) == (1, 4)


def test_dp_auto_is_resolved_at_trainer_construction(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=2))
    strategy = trainer.strategy
    assert isinstance(strategy, TensorParallelStrategy)
    assert strategy._data_parallel_size == 2 and strategy._tensor_parallel_size == 2
    assert strategy.launcher is not None and hasattr(strategy.launcher, "_strategy")  # the preflight launcher
    assert strategy.world_size == 4


def test_auto_auto_multi_node_puts_tp_inside_node(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, devices=4, num_nodes=2, strategy=TensorParallelStrategy())
    assert (trainer.strategy._data_parallel_size, trainer.strategy._tensor_parallel_size) == (2, 4)


@pytest.mark.parametrize(
    ("dp", "tp", "num_nodes", "devices", "expected"),
    [
        ("auto", "auto", 1, 1, (1, 1)),
        ("auto", "auto", 1, 8, (1, 8)),
        ("auto", "auto", 2, 4, (2, 4)),
        ("auto", 8, 2, 4, (1, 8)),
        ("auto", 2, 2, 4, (4, 2)),
        (4, "auto", 1, 8, (4, 2)),
        (2, 4, 2, 4, (2, 4)),
    ],
)
def test_resolved_sizes(dp: Any, tp: Any, num_nodes: int, devices: int, expected: tuple[int, int]) -> None:
    strategy = TensorParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)
    strategy.parallel_devices = [torch.device("cpu")] * devices
    strategy.num_nodes = num_nodes
    assert strategy.resolved_sizes() == expected


@pytest.mark.parametrize(("dp", "tp"), [("auto", 3), (3, "auto"), (2, 2), (8, 2)])
def test_resolved_sizes_mismatch(dp: Any, tp: Any) -> None:
    strategy = TensorParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)
    strategy.parallel_devices = [torch.device("cpu")] * 4
    strategy.num_nodes = 2
    with pytest.raises(MeshConfigError, match="world size 8"):
        strategy.resolved_sizes()


def test_unsupported_precision_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64-true"):
        cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(), precision="64-true")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"async_tp": True, "compile": True}, ["async_tp=True", "CUDA", "'cpu'", "async_tp=False"]),
        ({"float8": True}, ["float8=True", "8.9", "'cpu'", "float8=False"]),
    ],
    ids=["async_tp", "float8"],
)
def test_gpu_only_features_are_refused_on_cpu_before_spawn(tmp_path: Path, kwargs: dict, words: list[str]) -> None:
    from lightning_tp.errors import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError) as info:
        cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(**kwargs))
    for word in words:
        assert word in str(info.value)


def test_timeout_defaults_to_ten_minutes_and_takes_seconds() -> None:
    from datetime import timedelta

    assert TensorParallelStrategy()._timeout == timedelta(minutes=10)
    assert TensorParallelStrategy(timeout=30)._timeout == timedelta(seconds=30)
    assert TensorParallelStrategy(timeout=timedelta(seconds=90))._timeout == timedelta(seconds=90)


def test_activation_checkpointing_and_compile_are_accepted(tmp_path: Path) -> None:
    strategy = TensorParallelStrategy(activation_checkpointing="selective", compile=True)
    cpu_trainer(tmp_path, devices=2, strategy=strategy)
    assert (strategy.activation_checkpointing, strategy.compile) == ("selective", True)
    assert strategy.tensor_parallel_size == 2


# ---------------------------------------------------------------------------------------------- registered names


@pytest.mark.parametrize(
    ("name", "sequence_parallel", "loss_parallel"),
    [
        ("tensor_parallel", True, True),
        ("tensor_parallel_no_sp", False, True),
        ("tensor_parallel_no_loss_parallel", True, False),
        ("tensor_parallel_tp_only", False, False),
    ],
)
def test_registered_strategy_names(tmp_path: Path, name: str, sequence_parallel: bool, loss_parallel: bool) -> None:
    assert lightning_tp.TensorParallelStrategy is TensorParallelStrategy
    assert name in StrategyRegistry
    trainer = cpu_trainer(tmp_path, devices=2, strategy=name)
    strategy = trainer.strategy
    assert type(strategy) is TensorParallelStrategy
    assert strategy.sequence_parallel is sequence_parallel
    assert strategy.loss_parallel is loss_parallel
    assert strategy.fsdp is True and strategy.plan == "auto"
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (1, 2)


# ---------------------------------------------------------------------------------------------- preflight on fit()


def test_preflight_rejects_unshardable_model_before_spawn(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, devices=8, strategy=TensorParallelStrategy(tensor_parallel_size=8))
    with pytest.raises(ModelShapeError) as info:
        trainer.fit(ModelModule(meta_llama(intermediate_size=190)))
    assert "intermediate_size=190" in str(info.value) and "tensor_parallel_size=8" in str(info.value)


def test_preflight_rejects_auto_plan_without_llama(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(plan="auto"))
    with pytest.raises(PlanError, match="plan="):
        trainer.fit(ModelModule(nn.Linear(8, 8)))


def test_preflight_rejects_dict_plan_typo(tmp_path: Path) -> None:
    plan = {"model.model.layers.*.self_attn.q_prj": ColwiseParallel()}
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(plan=plan))
    with pytest.raises(PlanError) as info:
        trainer.fit(ModelModule(meta_llama()))
    assert "q_prj" in str(info.value) and "model.model.layers.0.self_attn.q_proj" in str(info.value)


def test_preflight_rejects_unknown_plan_name(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(plan="lama"))
    with pytest.raises(PlanError, match="Did you mean 'llama'"):
        trainer.fit(ModelModule(meta_llama()))


class _FSDP1Wrapped(FullyShardedDataParallel):
    """An ``isinstance``-faithful FSDP1 wrapper. Real FSDP1 cannot be built here: it needs a process group and
    refuses CPU-only machines ("FSDP needs a non-CPU accelerator device")."""

    def __init__(self, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self._fsdp_wrapped_module = module


def test_preflight_rejects_fsdp1_wrapped_submodule(tmp_path: Path) -> None:
    module = ModelModule(nn.Sequential(_FSDP1Wrapped(nn.Linear(8, 8)), nn.Linear(8, 8)))
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(plan={"model.1": ColwiseParallel()}))
    with pytest.raises(TypeError, match="FSDP1") as info:
        trainer.fit(module)
    assert "model.0" in str(info.value)


def test_valid_model_passes_preflight_and_reaches_spawn(tmp_path: Path) -> None:
    """Control for the tests above: a shardable model gets through preflight, up to the (blocked) launch."""
    trainer = cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=4))
    with pytest.raises(SpawnBlocked):
        trainer.fit(ModelModule(meta_llama()))
    assert trainer.strategy._tensor_parallel_size == 4


def test_model_built_in_configure_model_is_checked_later(tmp_path: Path) -> None:
    """Without parameters at launch (model built in ``configure_model``) preflight defers to ``setup``."""

    class Deferred(ModelModule):
        def __init__(self) -> None:
            L.LightningModule.__init__(self)
            self.model = None

        def configure_model(self) -> None:
            self.model = meta_llama(intermediate_size=190)

    trainer = cpu_trainer(tmp_path, devices=8, strategy=TensorParallelStrategy(tensor_parallel_size=8))
    with pytest.raises(SpawnBlocked):
        trainer.fit(Deferred())
    # the same check that setup() runs rejects the model once it exists
    module = Deferred()
    module.configure_model()
    with pytest.raises(ModelShapeError, match="intermediate_size"):
        check_model(trainer.strategy, module)


def test_unsupported_precision_is_rejected_for_registered_names(tmp_path: Path) -> None:
    # Lightning's own check only sees strategy instances; ours also covers `strategy="tensor_parallel"`.
    with pytest.raises(ValueError, match="TensorParallelStrategy does not support .*64-true.*bf16-mixed"):
        cpu_trainer(tmp_path, devices=2, strategy="tensor_parallel", precision="64-true")


def test_sequence_length_must_divide_tp_under_sequence_parallel() -> None:
    from types import SimpleNamespace

    from lightning_tp.errors import SequenceLengthError
    from lightning_tp.parallel.plans import resolve_plan

    model = Llama(get_config("debug"))
    model.init_weights(seed=0)
    strategy = TensorParallelStrategy(tensor_parallel_size=2)
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2)}  # a stand-in for the 2D mesh
    strategy._resolved_plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    install_sequence_check(model, strategy._resolved_plan, 2)
    assert model(torch.zeros(1, 6, dtype=torch.long)).shape == (1, 6, 512)
    with pytest.raises(SequenceLengthError, match="length 5 .* tensor_parallel_size=2.*sequence_parallel=False"):
        model(torch.zeros(1, 5, dtype=torch.long))
