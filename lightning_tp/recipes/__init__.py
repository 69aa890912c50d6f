"""Hydra recipe support: typed config schemas and the run function shared by the recipe scripts."""

from __future__ import annotations

from lightning_tp.recipes.config import register_configs

__all__ = ["flags_first", "register_configs"]


def flags_first(argv: list[str]) -> list[str]:
    """Move Hydra's flags (``--multirun``, ``--cfg job``, ...) before the overrides, keeping both orders.

    Hydra's parser rejects an override after a flag (``a=1 --multirun b=1,2``); users write them that way.
    Overrides are the tokens with ``=`` or a leading ``~``; a flag's value (``job`` in ``--cfg job``)
    stays right after its flag.
    """
    script, args = argv[:1], argv[1:]
    flags, overrides = [], []
    for token in args:
        is_override = not token.startswith("-") and ("=" in token or token.startswith("~"))
        (overrides if is_override else flags).append(token)
    return script + flags + overrides
