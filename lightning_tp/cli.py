"""``lightning-tp``: the console entry point. ``lightning-tp pretrain|finetune [hydra overrides and flags]``.

Every argument after the recipe name goes to Hydra unchanged (``key=value``, ``--cfg job``,
``--multirun``, ``--help``). The recipe scripts live in ``recipes/`` beside the package (an editable
install from a clone); the command runs them as ``python recipes/NAME.py ...`` would, so Lightning can
re-launch the same script for the other ranks.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

RECIPES = ("pretrain", "finetune")
USAGE = f"usage: lightning-tp {{{','.join(RECIPES)}}} [key=value ...] [--cfg job] [--multirun] [--help]"


def recipe_path(name: str) -> Path:
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"lightning-tp: recipe {str(path)!r} not found; install from a clone with `pip install -e .`.")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in RECIPES:
        raise SystemExit(f"lightning-tp: unknown recipe {argv[0]!r}; choose one of {', '.join(RECIPES)}.\n{USAGE}")
    path = recipe_path(argv[0])
    sys.argv = [str(path), *argv[1:]]
    runpy.run_path(str(path), run_name="__main__")


if __name__ == "__main__":
    main()
