"""Typed errors raised for user mistakes. Each message names the parameter, the value and the fix."""

from __future__ import annotations

__all__ = [
    "EnvironmentConfigError",
    "LightningTPError",
    "MeshConfigError",
    "ModelShapeError",
    "PlanError",
    "SequenceLengthError",
    "UnsupportedFeatureError",
]


class LightningTPError(ValueError):
    """Base class of every configuration error raised by lightning_tp."""


class MeshConfigError(LightningTPError):
    """``tensor_parallel_size`` × ``data_parallel_size`` does not fit the devices."""


class ModelShapeError(LightningTPError):
    """A model dimension cannot be sharded over the tensor-parallel degree."""


class PlanError(LightningTPError):
    """A plan is unknown, malformed, or does not match the model's modules."""


class SequenceLengthError(LightningTPError):
    """The sequence length cannot be split over the tensor-parallel ranks under sequence parallelism."""


class EnvironmentConfigError(LightningTPError):
    """The machine cannot run the job as asked: too many devices or processes, or the rendezvous port is taken."""


class UnsupportedFeatureError(LightningTPError):
    """An opt-in feature (async TP, float8) cannot run on this accelerator or software stack."""
