"""The package on its own: a wheel installed without the clone runs the recipes (their ranks included) and the
planner from its packaged configs; a typed error in a recipe command ends it with one line on stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from paths import ROOT

LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "HYDRA_FULL_ERROR",
              "PYTHONPATH")
TINY_RUN = ["model=debug", "trainer=cpu", "trainer.devices=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "data.seq_len=32", "data.batch_size=4", "sample_tokens=1", "logger=csv"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.multiprocess
def test_wheel_runs_recipes_and_planner_without_the_clone(tmp_path: Path) -> None:
    # Build from a copy of the sources, so no build/ of the checkout (or a stale file in it) goes into the wheel;
    # no build isolation: the job may be offline, and setuptools is installed.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "lightning_tp", src / "lightning_tp",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
              str(src)], tmp_path))
    (wheel,) = dist.glob("lightning_tp-*.whl")

    # A venv that reuses this interpreter's torch, lightning and hydra, but has its own lightning_tp: the wheel's.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--force-reinstall",
              "--no-warn-script-location", "-q", str(wheel)], tmp_path))
    work = tmp_path / "work"  # not the checkout: nothing of the clone is on the path
    work.mkdir()
    where = _ok(_run([str(python), "-c", "import lightning_tp, lightning_tp.recipes as r;"
                      " print(lightning_tp.__file__); print(r.CONF_DIR)"], work)).stdout.split()
    for path in where:
        assert Path(path).resolve().is_relative_to(env_dir.resolve()), where
    cli = str(bin_dir / "lightning-tp")

    job = _ok(_run([cli, "pretrain", "--cfg", "job", "model=debug"], work)).stdout
    assert "name: debug" in job and "_target_: lightning_tp.TensorParallelStrategy" in job

    plan = _ok(_run([cli, "plan", "model=llama3_8b"], work)).stdout
    assert plan.startswith("Plan: llama3_8b (8.03B parameters)") and "model.layers.0.mlp.down_proj" in plan

    # Two steps on 2 CPU ranks: rank 1 is Lightning's re-launch of `python -m lightning_tp.recipes.pretrain`.
    corpus = work / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 400)
    _ok(_run([cli, "pretrain", *TINY_RUN, f"data.path={corpus}", f"data.cache_dir={work / 'cache'}",
              "out_dir=out"], work, timeout=240))
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert (work / "out" / "last" / ".metadata").is_file()


# ------------------------------------------------------------------------------- one-line typed errors (fast)


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
