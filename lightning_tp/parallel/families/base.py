"""What a model family is to the auto plan: the transformers classes it covers and the function
that writes their plan. Families register themselves here (``register_family``); the auto plan
(:func:`lightning_tp.parallel.plans.resolve_plan`) looks a model up by its classes
(:func:`family_of`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

__all__ = ["FAMILIES", "Family", "FamilyPlanFn", "family_of", "register_family"]

FamilyPlanFn = Callable[..., dict[str, ParallelStyle]]
"""``plan(model, *, sequence_parallel: bool, loss_parallel: bool) -> {glob: style}``: ``model`` is
the causal LM (its ``config`` and modules), globs are relative to it."""


@dataclass(frozen=True)
class Family:
    """A family of causal LMs one plan function serves."""

    name: str
    """Short name (docs, errors, the planner): ``"llama"``, ``"gemma2"``, ..."""
    classes: tuple[str, ...]
    """transformers class names (a user's subclass of one is covered too)."""
    plan: FamilyPlanFn
    """Writes the plan for one model of the family."""
    extras: str = ""
    """The collectives per layer beyond the Llama minimum, in words ("" when none)."""
    native: tuple[type[nn.Module], ...] = ()
    """This package's own model classes the family covers (the native ``Llama``)."""
    sharded_dims: tuple[tuple[str, str], ...] = ()
    """``(config field, what it sizes)`` for each dimension the plan splits over tp, naming the
    family's own modules in the shape errors (empty: the Llama family's)."""


FAMILIES: dict[str, Family] = {}
"""Every registered family by name, in registration order."""


def register_family(family: Family, *, override: bool = False) -> Family:
    """Add ``family`` to :data:`FAMILIES` (a name or class taken by another family is refused
    unless ``override``)."""
    taken = {c: f.name for f in FAMILIES.values() if f.name != family.name for c in f.classes}
    clash = [c for c in family.classes if c in taken]
    if not override and (family.name in FAMILIES or clash):
        what = (f"the name {family.name!r}" if family.name in FAMILIES
                else f"{', '.join(clash)} (family {taken[clash[0]]!r})")
        raise ValueError(f"A family already covers {what}; pass override=True to replace it.")
    FAMILIES[family.name] = family
    return family


def transformers_classes(model: nn.Module) -> list[type]:
    """The classes of ``model``'s type that come from transformers, most derived first."""
    return [c for c in type(model).__mro__ if c.__module__.startswith("transformers.")]


def family_of(model: nn.Module) -> Family | None:
    """The family whose class (or native class) ``model`` is an instance of, the most derived
    match first; ``None`` when no family covers it."""
    for cls in type(model).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.classes and cls.__module__.startswith("transformers."):
                return family
            if cls in family.native:
                return family
    return None
