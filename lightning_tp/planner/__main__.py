"""``python -m lightning_tp.planner [key=value ...]``: the same as ``lightning-tp plan``."""

from lightning_tp.planner.cli import main

main()
