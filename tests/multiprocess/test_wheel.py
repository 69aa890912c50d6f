"""The package on its own: a wheel installed without the clone runs the recipes (their ranks included) and the
planner from its packaged configs. One-line errors of the recipe commands are ``tests/unit/test_packaging.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from launching import launch_env
from paths import ROOT

pytestmark = pytest.mark.multiprocess

PLAIN = ("HYDRA_FULL_ERROR", "PYTHONPATH")
"""Also left out of the commands' environment: nothing of the clone is on the path."""
TINY_RUN = ["model=debug", "trainer=cpu", "trainer.devices=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "data.seq_len=32", "data.batch_size=4", "sample_tokens=1", "logger=csv"]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=launch_env(drop=PLAIN), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


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
