"""LightningCLI: ``--trainer.strategy=lightning_tp.TensorParallelStrategy`` with its arguments, and ``CausalLMModule``.

Fast tier: the CLI parses, prints its config and builds the Trainer (strategy included); nothing is fitted.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jsonargparse  # noqa: F401  (in the test extra: LightningCLI needs jsonargparse[signatures])
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_tp import CausalLMModule, TensorParallelStrategy
from lightning_tp.errors import MeshConfigError

STRATEGY = ["--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=lightning_tp.TensorParallelStrategy", "--trainer.strategy.tensor_parallel_size=2"]


def _cli(args: list[str], tmp_path: Path) -> LightningCLI:
    return LightningCLI(CausalLMModule, run=False, save_config_callback=None, seed_everything_default=0,
                        args=[*args, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])


def _print_config(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        _cli([*args, "--print_config"], tmp_path)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_strategy_and_its_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _print_config([*STRATEGY, "--model.model=small"], tmp_path, capsys)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_tp.TensorParallelStrategy"
    assert strategy["init_args"]["tensor_parallel_size"] == 2
    assert strategy["init_args"]["data_parallel_size"] == "auto" and strategy["init_args"]["plan"] == "auto"
    assert config["model"]["model"] == "small"


def test_run_false_builds_a_trainer_with_the_strategy(tmp_path: Path) -> None:
    cli = _cli([*STRATEGY, "--trainer.max_steps=3", "--model.lr=1e-3"], tmp_path)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, TensorParallelStrategy)
    assert strategy.tensor_parallel_size == 2 and strategy.data_parallel_size == 1
    assert isinstance(cli.model, CausalLMModule) and cli.model.hparams["lr"] == 1e-3
    assert cli.trainer.max_steps == 3 and cli.trainer.num_devices == 2


def test_strategy_options_from_the_command_line(tmp_path: Path) -> None:
    cli = _cli([*STRATEGY, "--trainer.strategy.timeout=30", "--trainer.strategy.sequence_parallel=false",
                "--trainer.strategy.plan=llama", "--trainer.strategy.activation_checkpointing=selective"], tmp_path)
    strategy = cli.trainer.strategy
    assert strategy._timeout == timedelta(seconds=30)
    assert strategy.sequence_parallel is False and strategy.plan == "llama"


def test_printed_config_runs_back_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _print_config([*STRATEGY, "--trainer.strategy.timeout=45"], tmp_path, capsys)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    strategy = _cli([f"--config={path}"], tmp_path).trainer.strategy
    assert isinstance(strategy, TensorParallelStrategy) and strategy.tensor_parallel_size == 2
    assert strategy._timeout == timedelta(seconds=45)


def test_registered_name_works_too(tmp_path: Path) -> None:
    cli = _cli(["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=tensor_parallel"], tmp_path)
    assert isinstance(cli.trainer.strategy, TensorParallelStrategy) and cli.trainer.strategy.tensor_parallel_size == 2


def test_sizes_that_do_not_fit_the_devices_fail_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError, match="Fix"):
        _cli([*STRATEGY[:-1], "--trainer.strategy.tensor_parallel_size=3"], tmp_path)


def test_strategy_help_lists_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(CausalLMModule, run=False, args=["--trainer.strategy.help", "lightning_tp.TensorParallelStrategy"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    for name in ("tensor_parallel_size", "plan", "timeout", "activation_checkpointing"):
        assert f"--trainer.strategy.{name}" in text
