"""What ``python -m lightning_tp.recipes.pretrain|finetune`` (``lightning-tp pretrain|finetune``)
do around Hydra: put flags before overrides, explain a misspelled key before Hydra runs, and end a
typed error with one line on stderr. :func:`recipe_main` builds each recipe module's ``main``.

A typed error (:class:`~lightning_tp.errors.LightningTPError` and its subclasses: mesh, model shape,
plan, sequence length, environment, checkpoint, data, tokenizer, recipe config) already names the
input and the fix, so the command prints ``lightning-tp RECIPE: ErrorClass: message`` and exits with
status 1 instead of a traceback and Hydra's ``HYDRA_FULL_ERROR`` hint. With ``HYDRA_FULL_ERROR=1``
it is raised with its traceback. Any other exception keeps Hydra's reporting (its traceback).

Ranks > 0 run the same module (Lightning's script launcher re-runs ``python -m
lightning_tp.recipes.NAME`` or the script that was started), so a typed error raised inside a rank
ends that rank the same way, its line saying which rank it was (``lightning-tp pretrain: rank 2:
SequenceLengthError: ...``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from lightning_tp.errors import LightningTPError

__all__ = ["one_line", "recipe_main", "run_recipe", "typed_errors_pass_hydra"]

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
"""Hydra's switch for full tracebacks; ``1`` also makes typed errors raise with theirs."""


def _full_error() -> bool:
    return os.environ.get(FULL_ERROR_ENV) == "1"  # as Hydra reads it


class _TypedFailure(BaseException):
    """Carries a typed error out of the Hydra task past Hydra's ``except Exception`` (which would
    print it with a traceback), to :func:`run_recipe`."""

    def __init__(self, error: LightningTPError) -> None:
        super().__init__(error)
        self.error = error


def _rank() -> int:
    """This process's global rank in a launched job (0 in the launching process, or outside a
    job)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # only for the label
        pass
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def one_line(recipe: str, error: BaseException) -> str:
    """``lightning-tp RECIPE: [rank N: ]ErrorClass: message [notes]`` on a single line."""
    parts = [str(error), *getattr(error, "__notes__", ())]
    text = " ".join(line.strip() for part in parts for line in str(part).splitlines()
                    if line.strip())
    rank = _rank()
    where = f"rank {rank}: " if rank else ""
    return f"lightning-tp {recipe}: {where}{type(error).__name__}: {text}"


def typed_errors_pass_hydra(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task (under ``@hydra.main``) so that a typed error reaches
    :func:`run_recipe` instead of Hydra's traceback printer; unchanged with
    ``HYDRA_FULL_ERROR=1``."""

    @functools.wraps(task)  # Hydra unwraps __wrapped__ to find the task's module
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except LightningTPError as error:
            if _full_error():
                raise
            raise _TypedFailure(error) from error

    return wrapper


def run_recipe(recipe: str, hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function for ``recipe`` on ``sys.argv`` (reordered so flags come
    first), after checking its plain overrides against the schema; a typed error ends the process
    with :func:`one_line`."""
    from lightning_tp.recipes import check_overrides, flags_first

    sys.argv = flags_first(sys.argv)
    try:
        check_overrides(recipe, sys.argv)
        hydra_main()
    except _TypedFailure as failure:
        raise SystemExit(one_line(recipe, failure.error)) from None
    except LightningTPError as error:  # before Hydra ran (the override check) or HYDRA_FULL_ERROR=1
        if _full_error():
            raise
        raise SystemExit(one_line(recipe, error)) from None


def recipe_main(recipe: str) -> Callable[[], None]:
    """The ``main`` of the module ``lightning_tp.recipes.<recipe>``: compose ``conf/<recipe>.yaml``
    with the command line, instantiate and fit (:func:`lightning_tp.recipes.run.run`, from the
    ``checkpoint`` key where the recipe has one), as :func:`run_recipe` runs it.

    The Hydra job is named in the recipe's YAML (``hydra.job.name``), not after this module.
    """
    import hydra
    from omegaconf import DictConfig

    from lightning_tp.recipes.config import CONF_DIR, register_configs

    register_configs()

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=recipe)
    @typed_errors_pass_hydra
    def task(cfg: DictConfig) -> None:
        from lightning_tp.recipes.run import run  # looked up at each call (tests replace it)

        run(cfg, checkpoint=cfg.get("checkpoint"))

    def main() -> None:
        """The command line: ``sys.argv[1:]`` are Hydra overrides and flags."""
        run_recipe(recipe, task)

    return main
