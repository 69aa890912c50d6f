"""The recipe commands of the installed package: a typed error ends one with one line on stderr (and its traceback
under ``HYDRA_FULL_ERROR=1``). A wheel installed without the clone, running the recipes and the planner, is
``tests/multiprocess/test_wheel.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from launching import launch_env
from paths import ROOT

PLAIN = ("HYDRA_FULL_ERROR", "PYTHONPATH")
"""Also left out of the commands' environment: the error format is the default one, and the package is the one
installed."""


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=launch_env(drop=PLAIN, **env), capture_output=True, text=True,
                          timeout=timeout)


def _single_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix) and "Fix" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    return lines[0]


def test_missing_data_path_ends_with_one_line(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "lightning_tp.recipes.pretrain", "model=debug", f"data.path={tmp_path / 'nope'}",
                 f"out_dir={tmp_path / 'out'}"], tmp_path)
    line = _single_error_line(proc, "lightning-tp pretrain: DataError: ")
    assert "nope" in line


def test_mesh_error_from_the_console_command_ends_with_one_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 50)
    proc = _run([sys.executable, "-m", "lightning_tp.cli", "pretrain", "model=debug", "strategy.tensor_parallel_size=3",
                 f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
                 f"out_dir={tmp_path / 'out'}"], tmp_path)
    line = _single_error_line(proc, "lightning-tp pretrain: MeshConfigError: ")
    assert "tensor_parallel_size (3)" in line


def test_full_error_env_gives_the_traceback(tmp_path: Path) -> None:
    script = str(ROOT / "recipes" / "finetune.py")  # the clone's thin script: the same entry point
    proc = _run([sys.executable, script, "model=debug", f"checkpoint={tmp_path / 'nope'}",
                 f"out_dir={tmp_path / 'out'}"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lightning_tp.errors.CheckpointError: checkpoint=")


def test_recipe_config_error_before_hydra_is_one_line(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_tp import cli

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as info:
        cli.main(["finetune", "trainer.max_stepz=5"])
    message = str(info.value.code)
    assert message.startswith("lightning-tp finetune: RecipeConfigError: Unknown key 'trainer.max_stepz'")
    assert "\n" not in message and "Fix" in message


def test_only_typed_errors_are_shortened(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_tp.errors import DataError
    from lightning_tp.recipes.entry import _TypedFailure, one_line, typed_errors_pass_hydra

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def fails(error: Exception):
        @typed_errors_pass_hydra
        def task(cfg: object) -> None:
            raise error
        return lambda: task(None)

    with pytest.raises(_TypedFailure):  # a BaseException: Hydra's `except Exception` lets it through
        fails(DataError("bad path. Fix: another"))()
    with pytest.raises(RuntimeError):  # any other error: Hydra prints it with its traceback, as before
        fails(RuntimeError("boom"))()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(DataError):
        fails(DataError("bad path. Fix: another"))()
    # Lines and notes (the launcher's note naming the rank that failed first) are joined into one line.
    error = DataError("first\nsecond. Fix: it")
    error.add_note("lightning-tp: rank 1 failed first")
    assert one_line("pretrain", error) == \
        "lightning-tp pretrain: DataError: first second. Fix: it lightning-tp: rank 1 failed first"
    monkeypatch.setenv("LOCAL_RANK", "2")  # a rank Lightning started says which it is
    assert one_line("finetune", DataError("x")) == "lightning-tp finetune: rank 2: DataError: x"
