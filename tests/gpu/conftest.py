"""The GPU tier's fixtures: the device its tests run on, and a dry run of them on the CPU.

``pytest -m gpu tests/gpu`` runs them on ``cuda:0`` where CUDA is visible; elsewhere ``tests/conftest.py`` skips them.
``GPU_CHECK_DRY_RUN=1`` (set by ``benchmarks/gpu_check.sh --dry-run``) runs the same tests on the CPU instead, so that
the script's plumbing (pytest's report, the summary table, the exit code) is exercised on a machine without a GPU:
that skip, and only that one, is lifted here for the tests of this folder. A test whose subject needs CUDA itself
(float8, DTensor's CUDA RNG) says so in its own ``pytest.skip`` or in its key number. The tests of this folder skip
with ``pytest.skip(...)`` calls, never with a ``skip`` mark, so that lifting the marks lifts nothing of theirs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DRY_RUN_ENV = "GPU_CHECK_DRY_RUN"
HERE = Path(__file__).resolve().parent


def dry_run() -> bool:
    return os.environ.get(DRY_RUN_ENV, "") not in ("", "0")


@pytest.hookimpl(trylast=True)  # after tests/conftest.py has marked the gpu tests skipped
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not dry_run():
        return
    for item in items:
        if item.get_closest_marker("gpu") and HERE in Path(str(item.path)).resolve().parents:
            item.own_markers[:] = [m for m in item.own_markers if m.name != "skip"]


@dataclass(frozen=True)
class Tier:
    """Where the GPU tier runs: ``accelerator`` for the Trainer, ``device`` for tensors built outside it."""

    accelerator: str
    device: str
    dry_run: bool


@pytest.fixture(scope="session")
def tier() -> Tier:
    if dry_run():
        return Tier(accelerator="cpu", device="cpu", dry_run=True)
    return Tier(accelerator="cuda", device="cuda:0", dry_run=False)


@pytest.fixture(autouse=True, scope="module")
def _leave_no_process_group() -> Iterator[None]:
    """The Trainers of a module run in this process and share one default process group (world size 1), which
    Lightning leaves initialised, with the variables it set (``MASTER_ADDR``, ``MASTER_PORT``, ...): both are
    removed after the module, so that a later test starting its own group (``tests/unit``'s 1-rank meshes) can."""
    saved = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)
