"""Interactive use: the fork launch path outside a notebook, and the walkthrough notebook run by a real kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_fork_launch_brings_full_trained_weights_back(tmp_path: Path) -> None:
    out = tmp_path / "fork.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "fork.py"), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["plain"] and result["n"] == 21
    assert result["param_err"] <= 1e-4  # equal to an independent single-process run of the same 5 steps
    assert "train_loss" in result["callback_metrics"]
    assert result["meta_materialised"] and result["inv_freq_finite"]
    assert isinstance(result["sample"], str)


def test_interactive_session_picks_the_fork_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L
    from lightning.fabric.utilities import imports

    from lightning_tp import TensorParallelStrategy
    from lightning_tp.launchers import ForkLauncher, ScriptLauncher

    monkeypatch.setattr(imports, "_IS_INTERACTIVE", True)
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.accelerator_connector._IS_INTERACTIVE", True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TensorParallelStrategy(), logger=False)
    assert isinstance(trainer.strategy.launcher, ForkLauncher) and trainer.strategy.launcher.is_interactive_compatible
    monkeypatch.setattr(imports, "_IS_INTERACTIVE", False)
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.accelerator_connector._IS_INTERACTIVE", False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TensorParallelStrategy(), logger=False)
    assert isinstance(trainer.strategy.launcher, ScriptLauncher)
