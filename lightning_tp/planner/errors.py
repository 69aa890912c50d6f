"""The planner's typed error, below every planner module that raises it."""

from __future__ import annotations

from lightning_tp.errors import LightningTPError

__all__ = ["PlannerError"]


class PlannerError(LightningTPError):
    """A planner input is unknown or inconsistent (the message names the key, the value and the
    fix)."""
