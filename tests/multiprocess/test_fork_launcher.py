"""Interactive use: the fork launch path outside a notebook, and the walkthrough notebook run by a real kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import launch_env
from paths import ROOT, WORKERS

pytestmark = pytest.mark.multiprocess


def test_fork_launch_brings_full_trained_weights_back(tmp_path: Path) -> None:
    out = tmp_path / "fork.json"
    proc = subprocess.run([sys.executable, str(WORKERS / "fork.py"), str(out)], env=launch_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["plain"] and result["n"] == 21
    assert result["param_err"] <= 1e-4  # equal to an independent single-process run of the same 5 steps
    assert "train_loss" in result["callback_metrics"] and result["global_step"] == 5
    assert result["meta_materialised"] and result["inv_freq_finite"]
    assert isinstance(result["sample"], str)


def test_interactive_session_picks_the_fork_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L
    from lightning.fabric.utilities import imports

    from lightning_tp import TensorParallelStrategy
    from lightning_tp.launch import ForkLauncher, ScriptLauncher

    monkeypatch.setattr(imports, "_IS_INTERACTIVE", True)
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.accelerator_connector._IS_INTERACTIVE", True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TensorParallelStrategy(), logger=False)
    assert isinstance(trainer.strategy.launcher, ForkLauncher) and trainer.strategy.launcher.is_interactive_compatible
    monkeypatch.setattr(imports, "_IS_INTERACTIVE", False)
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.accelerator_connector._IS_INTERACTIVE", False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TensorParallelStrategy(), logger=False)
    assert isinstance(trainer.strategy.launcher, ScriptLauncher)


def test_walkthrough_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 clean_launch_environ: None) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel, and the ranks the notebook starts, inherit it
    nb = nbformat.read(ROOT / "recipes" / "notebooks" / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert "weights are plain full tensors: True" in text
    assert "trained 100 steps" in text
    first, last = (float(x) for x in text.split("loss fell from ")[1].split()[0:3:2])
    assert last < 0.8 * first, (first, last)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curve was drawn
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert "'steps': 10, 'world_size': 4" in text  # the recipe ran from Python through the same launcher
