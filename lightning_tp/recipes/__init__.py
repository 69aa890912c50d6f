"""Hydra recipe support: typed config schemas, the packaged configs (:data:`CONF_DIR`), the run
function and the entry points ``python -m lightning_tp.recipes.pretrain|finetune`` (what
``lightning-tp pretrain|finetune`` runs)."""

from __future__ import annotations

from lightning_tp.recipes.config import CONF_DIR, register_configs

__all__ = ["CONF_DIR", "check_overrides", "flags_first", "register_configs"]

_SWEEPS = ("range(", "choice(", "glob(")


def flags_first(argv: list[str]) -> list[str]:
    """Move Hydra's flags (``--multirun``, ``--cfg job``, ...) before the overrides, keeping both
    orders.

    Hydra's parser rejects an override after a flag (``a=1 --multirun b=1,2``); users write them
    that way. Overrides are the tokens with ``=`` or a leading ``~``; a flag's value (``job`` in
    ``--cfg job``) stays right after its flag.
    """
    script, args = argv[:1], argv[1:]
    flags, overrides = [], []
    for token in args:
        is_override = not token.startswith("-") and ("=" in token or token.startswith("~"))
        (overrides if is_override else flags).append(token)
    return script + flags + overrides


def _plain(token: str) -> bool:
    """Whether ``token`` is a plain ``key=value`` override: no flag, no ``+``/``~``, no ``hydra.*``
    key, no sweep."""
    if token.startswith(("-", "+", "~", "hydra.")) or "=" not in token:
        return False
    value = token.partition("=")[2]
    return "," not in value and not value.startswith(_SWEEPS)


def check_overrides(recipe: str, argv: list[str]) -> None:
    """Compose ``recipe`` with the command line's plain overrides before Hydra runs, so a misspelled
    key or a wrong type ends with :class:`~lightning_tp.recipes.config.RecipeConfigError` (close
    matches, expected type, the fix) instead of Hydra's terser message; the recipe entry points
    print it as one line and exit with status 1. Sweeps (``a=1,2``), ``hydra.*`` and ``+``/``~``
    overrides are left to Hydra.
    """
    from lightning_tp.recipes.config import compose_recipe

    compose_recipe(recipe, [t for t in argv[1:] if _plain(t)])
