"""Single-process tests of the promises ``TensorParallelStrategy`` keeps as a ``ModelParallelStrategy`` subclass:
the parent's exception types, the parent's device setup order, plan=None / user-parallelized models left alone,
saves that never replace what the strategy did not write, and a launching process whose environment is left as
Lightning leaves it.

Lightning's own tests for the parent run against the subclass with ``tools/lightning_contract.py``; these are the
project's tests for each behaviour that exposed. No test here starts a process: Lightning's child launch is
replaced by an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
import torch.distributed as dist
from launching import SpawnBlocked, cpu_trainer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import nn
from user_files import user_dir, user_file

from lightning_tp import TensorParallelStrategy
from lightning_tp.errors import (
    CheckpointError,
    CheckpointPathError,
    ConfigureModelRequiredError,
    MeshConfigError,
    ModelNotRecognisedError,
    PrecisionConfigError,
    UnsupportedFeatureError,
    UnsupportedModuleError,
)
from lightning_tp.launch import FAILURES_ENV, ScriptLauncher
from lightning_tp.launch.preflight import check_model
from lightning_tp.models import Llama, get_config

pytestmark = pytest.mark.usefixtures("no_spawn")  # tests/conftest.py: starting the ranks raises SpawnBlocked


class _Plain(L.LightningModule):
    """A module that is not a Llama, with or without a ``configure_model`` hook."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).sum()


class _PlainWithHook(_Plain):
    def configure_model(self) -> None:
        pass


class _LlamaModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Llama(get_config("debug"))


# ------------------------------------------------------------------------------------------- exception types


def test_a_wrong_mesh_is_a_runtime_error_as_in_the_parent(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="multiplied should equal the world size 4") as info:
        cpu_trainer(tmp_path, devices=4, strategy=TensorParallelStrategy(tensor_parallel_size=3))
    assert isinstance(info.value, MeshConfigError) and isinstance(info.value, ValueError)


def test_an_unsupported_precision_is_a_value_error_as_in_the_parent(tmp_path: Path) -> None:
    # Lightning's own connector refuses it first for any ModelParallelStrategy; the strategy's check says the same
    with pytest.raises(ValueError, match="precision='64-true'"):
        cpu_trainer(tmp_path, devices=2, precision="64-true", strategy=TensorParallelStrategy())
    strategy = TensorParallelStrategy()
    strategy._precision_plugin = mock.Mock(precision="16-mixed")
    strategy.parallel_devices, strategy.num_nodes = [torch.device("cpu")] * 2, 1
    with pytest.raises(ValueError, match="precision='16-mixed'") as info:
        strategy._configure_launcher()
    assert isinstance(info.value, PrecisionConfigError)


def test_fsdp1_modules_are_a_type_error_as_in_the_parent() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    module = _PlainWithHook()
    module.modules = mock.Mock(return_value=[mock.Mock(spec=FullyShardedDataParallel)])
    for plan in ("auto", None):
        with pytest.raises(TypeError, match="only supports the new FSDP2 APIs") as info:
            check_model(TensorParallelStrategy(plan=plan), module)
        assert isinstance(info.value, UnsupportedModuleError)


def test_plan_none_without_configure_model_is_the_parents_type_error_before_spawn(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(plan=None))
    with pytest.raises(TypeError, match="required to override the `configure_model\\(\\)` hook") as info:
        trainer.fit(_Plain(), torch.utils.data.DataLoader(torch.randn(4, 8)))
    assert isinstance(info.value, ConfigureModelRequiredError)
    # with the hook, the same model reaches the (blocked) launch: nothing else is checked before spawn
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy(plan=None))
    with pytest.raises(SpawnBlocked):
        trainer.fit(_PlainWithHook(), torch.utils.data.DataLoader(torch.randn(4, 8)))


def test_an_unrecognised_model_under_auto_names_plan_none(tmp_path: Path) -> None:
    # without configure_model the model can only be the strategy's to shard: refused before spawn
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy())
    with pytest.raises(ModelNotRecognisedError, match="plan=None") as info:
        trainer.fit(_Plain(), torch.utils.data.DataLoader(torch.randn(4, 8)))
    assert isinstance(info.value, TypeError) and "configure_model()" in str(info.value)
    # with configure_model the hook may parallelize it: decided on the ranks, after the hook ran
    trainer = cpu_trainer(tmp_path, devices=2, strategy=TensorParallelStrategy())
    with pytest.raises(SpawnBlocked):
        trainer.fit(_PlainWithHook(), torch.utils.data.DataLoader(torch.randn(4, 8)))


@pytest.mark.parametrize("kwargs", [{"activation_checkpointing": "full"}, {"compile": True},
                                    {"activation_checkpointing": "selective", "compile": True}])
def test_plan_none_refuses_options_that_need_the_strategys_plan(kwargs: dict) -> None:
    with pytest.raises(UnsupportedFeatureError, match="plan=None") as info:
        TensorParallelStrategy(plan=None, **kwargs)
    assert all(name in str(info.value) for name in kwargs) and "Fix:" in str(info.value)


def test_loading_a_directory_that_is_no_checkpoint_is_a_value_error_as_in_the_parent(tmp_path: Path) -> None:
    strategy = TensorParallelStrategy()
    strategy.model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="does not point to a valid checkpoint") as info:
        strategy.load_checkpoint(tmp_path)
    assert isinstance(info.value, CheckpointError)


# ------------------------------------------------------------------------------------------- device setup


@pytest.fixture
def keep_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """``set_world_ranks`` sets Lightning's process-wide rank; a mocked rank 1 must not silence later tests."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pytorch_rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero

    for module in (fabric_rank_zero, pytorch_rank_zero, utils_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", getattr(module.rank_zero_only, "rank", 0))


@pytest.mark.usefixtures("keep_rank_zero")
def test_setup_environment_sets_each_ranks_own_device_before_the_process_group() -> None:
    """On a (mocked) 2-GPU node, rank 1's accelerator gets ``cuda:1`` before the process group and the mesh."""
    calls: list[Any] = []
    strategy = TensorParallelStrategy(tensor_parallel_size=2)
    strategy.accelerator = mock.Mock(setup_device=lambda device: calls.append(("setup_device", device)))
    strategy.parallel_devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    strategy.cluster_environment = mock.Mock(local_rank=mock.Mock(return_value=1), node_rank=mock.Mock(return_value=0),
                                             creates_processes_externally=True)
    strategy._lightning_module = mock.Mock()
    init = mock.Mock(side_effect=lambda *a, **k: calls.append(("init_process_group", k.get("device_id"))))
    mesh = mock.Mock(side_effect=lambda *a, **k: calls.append(("mesh", a)))
    with mock.patch("lightning.fabric.utilities.distributed._init_dist_connection", init), \
         mock.patch("lightning.pytorch.strategies.model_parallel._init_dist_connection", init), \
         mock.patch("lightning.pytorch.strategies.model_parallel._setup_device_mesh", mesh):
        strategy.setup_environment()
    assert calls[0] == ("setup_device", torch.device("cuda", 1)), calls
    assert [c[0] for c in calls].index("init_process_group") < [c[0] for c in calls].index("mesh")
    assert calls[[c[0] for c in calls].index("mesh")][1][:2] == (1, 2)  # (dp, tp) resolved from "auto"


# ------------------------------------------------------------------------------------------- who parallelizes


@pytest.fixture
def one_rank_mesh():
    """A 1-rank gloo group and a (1, 1) mesh named like the strategy's: DTensors and FSDP2 exist for real."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def _strategy_on(mesh: Any, **kwargs: Any) -> TensorParallelStrategy:
    strategy = TensorParallelStrategy(**kwargs)
    strategy._device_mesh = mesh
    strategy._data_parallel_size = strategy._tensor_parallel_size = 1  # what setup_environment resolves
    return strategy


def test_a_model_parallelized_in_configure_model_is_left_as_it_is(one_rank_mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    module = _LlamaModule()  # a Llama the plan would recognise, already parallelized the way Lightning's guide does
    for block in module.model.model.layers:
        parallelize_module(block.mlp, one_rank_mesh["tensor_parallel"], {
            "gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})
    before = {n: type(p) for n, p in module.named_parameters()}
    assert _strategy_on(one_rank_mesh)._who_parallelizes(module) == "user"
    assert {n: type(p) for n, p in module.named_parameters()} == before  # nothing applied
    assert not isinstance(module.model.model.layers[0].self_attn.q_proj.weight, DTensor)

    fsdp_only = _PlainWithHook()
    fully_shard(fsdp_only.layer, mesh=one_rank_mesh["data_parallel"])
    assert _strategy_on(one_rank_mesh)._who_parallelizes(fsdp_only) == "user"


def test_auto_applies_the_plan_to_an_unparallelized_llama_and_refuses_an_unknown_model(one_rank_mesh: Any) -> None:
    assert _strategy_on(one_rank_mesh)._who_parallelizes(_LlamaModule()) == "plan"
    with pytest.raises(ModelNotRecognisedError, match="plan=None to keep ModelParallelStrategy's behaviour"):
        _strategy_on(one_rank_mesh)._who_parallelizes(_PlainWithHook())
    assert _strategy_on(one_rank_mesh, plan=None)._who_parallelizes(_PlainWithHook()) == "user"
    assert _strategy_on(one_rank_mesh)._who_parallelizes(L.LightningModule()) == "user"  # nothing to shard


def test_a_user_parallelized_model_refuses_options_that_need_the_plan(one_rank_mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    module = _PlainWithHook()
    fully_shard(module.layer, mesh=one_rank_mesh["data_parallel"])
    with pytest.raises(UnsupportedFeatureError, match="activation_checkpointing='full'"):
        _strategy_on(one_rank_mesh, activation_checkpointing="full")._who_parallelizes(module)


def test_tensor_parallelism_without_fsdp2_is_refused_with_data_parallel_replicas(one_rank_mesh: Any) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    module = _PlainWithHook()
    parallelize_module(module.layer, one_rank_mesh["tensor_parallel"], ColwiseParallel())
    strategy = _strategy_on(one_rank_mesh)
    assert strategy._who_parallelizes(module) == "user"  # dp = 1: nothing to synchronise
    with mock.patch.object(TensorParallelStrategy, "data_parallel_size", 2), \
         pytest.raises(MeshConfigError, match="would never average their gradients") as info:
        strategy._who_parallelizes(module)
    assert "fully_shard" in str(info.value)


# ------------------------------------------------------------------------------------------- safe saves


def _own_checkpoint(path: Path) -> Path:
    """What a sharded save writes (the shard contents do not matter to the path checks)."""
    path.mkdir()
    (path / ".metadata").write_bytes(b"dcp")
    (path / "__0_0.distcp").write_bytes(b"shard")
    torch.save({"lightning_tp": {"format": 1}, "global_step": 1}, path / "meta.pt")
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def _saving_strategy(distributed: bool) -> TensorParallelStrategy:
    strategy = TensorParallelStrategy(save_distributed_checkpoint=distributed)
    strategy.model = nn.Linear(2, 2)
    strategy.parallel_devices = [torch.device("cpu")]
    strategy._device_mesh = mock.Mock(**{"__getitem__": lambda self, key: mock.Mock(size=lambda: 1)})
    return strategy


def _checkpoint_with_user_file(tmp: Path) -> Path:
    path = _own_checkpoint(tmp / "last")
    (path / "README.md").write_text("what this run was")
    return path


def _other_strategys_checkpoint(tmp: Path) -> Path:
    path = tmp / "ddp.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, path)  # no layout entry: not this strategy's
    return path


def _half_meta_directory(tmp: Path) -> Path:
    (tmp / "sharded").mkdir()
    (tmp / "sharded" / "meta.pt").touch()  # what Lightning's parent treats as a checkpoint, and would delete
    return tmp / "sharded"


@pytest.mark.parametrize("distributed", [True, False], ids=["sharded", "single-file"])
@pytest.mark.parametrize("make", [user_file, user_dir, _checkpoint_with_user_file, _other_strategys_checkpoint,
                                  _half_meta_directory])
def test_a_save_never_replaces_what_the_strategy_did_not_write(tmp_path: Path, make: Any, distributed: bool) -> None:
    target = make(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointPathError) as info:
        _saving_strategy(distributed).save_checkpoint({"state_dict": {}, "global_step": 2}, target)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, CheckpointError)
    assert str(target) in str(info.value) and "nothing was touched" in str(info.value) and "Fix:" in str(info.value)
    assert _snapshot(tmp_path) == before


def test_a_save_through_a_taken_staging_or_backup_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "last.old").write_text("the user's backup")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointPathError, match="last.old"):
        _saving_strategy(True).save_checkpoint({"state_dict": {}, "global_step": 2}, tmp_path / "last")
    assert _snapshot(tmp_path) == before


def test_a_single_file_save_replaces_the_strategys_own_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    strategy = _saving_strategy(False)
    strategy.save_checkpoint({"state_dict": {}, "global_step": 1}, path)
    strategy.save_checkpoint({"state_dict": {}, "global_step": 2}, path)  # the strategy's own file: replaced
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_recover_leaves_a_users_siblings_alone(tmp_path: Path) -> None:
    from lightning_tp.checkpoint.consolidate import recover

    last = _own_checkpoint(tmp_path / "last")
    (tmp_path / "last.old").mkdir()
    (tmp_path / "last.old" / "mine.txt").write_text("not a checkpoint")
    (tmp_path / "last.tmp-notes").write_text("a user's file with a similar name")
    before = _snapshot(tmp_path)
    recover(last)
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- environment


def test_the_launching_process_keeps_the_failure_folder_out_of_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def children(self: Any) -> None:
        seen["children's"] = os.environ.get(FAILURES_ENV)
        self.procs = []

    monkeypatch.setattr(_SubprocessScriptLauncher, "_call_children_scripts", children)
    monkeypatch.delenv(FAILURES_ENV, raising=False)
    strategy = TensorParallelStrategy()
    environment = mock.Mock(creates_processes_externally=False)
    launcher = ScriptLauncher(strategy, environment, 2, 1)
    with mock.patch("lightning_tp.launch.script.preflight"), mock.patch("lightning_tp.launch.script._Observer"):
        assert launcher.launch(lambda: "trained") == "trained"
    assert seen["children's"] and Path(seen["children's"]).is_dir()  # the ranks it starts get the folder
    assert FAILURES_ENV not in os.environ
