"""Where things are, for tests at any depth under ``tests/`` (``tests/`` is on ``sys.path`` via ``conftest.py``)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""
WORKERS = ROOT / "tests" / "workers"
"""Scripts the multi-process tests launch as user scripts (Lightning starts the other ranks)."""
