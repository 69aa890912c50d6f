"""Files of the user's where a save may be pointed: a save must never replace them (``tests/unit/strategy/
test_contract.py`` checks them byte for byte, ``tests/unit/test_bad_inputs.py`` checks the error that refuses)."""

from __future__ import annotations

from pathlib import Path


def user_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("my notes")
    return tmp / "notes.txt"


def user_dir(tmp: Path) -> Path:
    (tmp / "results").mkdir()
    (tmp / "results" / "table.csv").write_text("a,b\n1,2\n")
    return tmp / "results"
