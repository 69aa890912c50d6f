"""The error type shared by every data module (pretraining corpora and fine-tuning data sets)."""

from __future__ import annotations

from lightning_tp.errors import LightningTPError

__all__ = ["DataError"]


class DataError(LightningTPError):
    """A corpus is missing, empty or too small, or a data parameter has an invalid value."""
