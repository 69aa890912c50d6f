"""Shared pytest configuration: the tiers (``multiprocess``, ``gpu``) and the fixtures of the tests that launch.

Plugins live in their own modules so that each concern stays in one file; what the launching tests share beyond
fixtures is in ``launching.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from launching import SpawnBlocked, is_launch_variable

# tests/_ci_deps.py: with CI=true a declared test dependency that is missing fails the run instead of skipping.
pytest_plugins = ["_ci_deps"]

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------- tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the layout honest (multi-process tests in ``tests/multiprocess``, and only there, so that
    ``-m "not multiprocess"`` is the unit tier), and skip ``gpu`` tests where no CUDA device is visible."""
    misplaced = []
    for item in items:
        try:
            tier = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue  # a test file outside tests/ (one a test writes and runs itself)
        marked = item.get_closest_marker("multiprocess") is not None
        if (tier == "unit" and marked) or (tier == "multiprocess" and not marked):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError("multi-process tests belong in tests/multiprocess/ (module-level"
                                " `pytestmark = pytest.mark.multiprocess`), every other test in tests/unit/;"
                                f" misplaced: {misplaced}")
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="gpu tier: needs a CUDA device, and none is visible here")
            for item in gpu:
                item.add_marker(skip)


# ---------------------------------------------------------------------------------------------------- launching


@pytest.fixture
def clean_launch_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the launch variables (``launching.LAUNCH_VARIABLES``, ``PL_*``, ``LIGHTNING_TP_*``, ...) from this
    process's environment for the test: what a job launched in-process starts from."""
    for name in [k for k in os.environ if is_launch_variable(k)]:
        monkeypatch.delenv(name)


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch, clean_launch_environ: None) -> None:
    """Lightning's script launcher raises :class:`launching.SpawnBlocked` instead of starting the ranks, and the
    environment holds no launch variables (which would make Lightning believe the ranks already exist, so that
    neither the launcher nor the strategy's pre-launch checks run)."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    def refuse(self: _SubprocessScriptLauncher) -> None:
        raise SpawnBlocked(f"{type(self).__name__} tried to start {self.num_processes * self.num_nodes} processes")

    monkeypatch.setattr(_SubprocessScriptLauncher, "_call_children_scripts", refuse)
