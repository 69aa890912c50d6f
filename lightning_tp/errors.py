"""Typed errors raised for user mistakes. Each message names the parameter, the value and the fix.

Every error is a :class:`LightningTPError` (a ``ValueError``) and also derives from the exception
Lightning's ``ModelParallelStrategy`` raises for the same condition, so ``except RuntimeError``
around a wrong mesh (or ``except TypeError`` around an FSDP1 model) keeps working when the strategy
class is swapped.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointPathError",
    "ConfigureModelRequiredError",
    "DataError",
    "EnvironmentConfigError",
    "LightningTPError",
    "MeshConfigError",
    "ModelNotRecognisedError",
    "ModelShapeError",
    "PlanError",
    "PrecisionConfigError",
    "SequenceLengthError",
    "UnsupportedFeatureError",
    "UnsupportedModuleError",
]


class LightningTPError(ValueError):
    """Base class of every configuration error raised by lightning_tp."""


class MeshConfigError(LightningTPError, RuntimeError):
    """``tensor_parallel_size`` × ``data_parallel_size`` does not fit the devices (the parent:
    ``RuntimeError``)."""


class ModelShapeError(LightningTPError):
    """A model dimension cannot be sharded over the tensor-parallel degree."""


class PlanError(LightningTPError):
    """A plan is unknown, malformed, or does not match the model's modules."""


class ModelNotRecognisedError(PlanError):
    """``plan="auto"`` (or a registered name) found no model it knows how to shard."""


class ConfigureModelRequiredError(ModelNotRecognisedError, TypeError):
    """No plan applies to the model (``plan=None``, or ``"auto"`` recognises none) and
    ``configure_model()`` is not overridden to parallelize it (the parent: ``TypeError``)."""


class UnsupportedModuleError(LightningTPError, TypeError):
    """The model holds modules the strategy cannot shard, e.g. FSDP1 wrappers (the parent:
    ``TypeError``)."""


class PrecisionConfigError(LightningTPError):
    """``Trainer(precision=...)`` is not one the strategy supports."""


class SequenceLengthError(LightningTPError):
    """The sequence length cannot be split over the tensor-parallel ranks under sequence
    parallelism."""


class EnvironmentConfigError(LightningTPError):
    """The machine cannot run the job as asked: too many devices or processes, or the rendezvous
    port is taken."""


class UnsupportedFeatureError(LightningTPError):
    """An opt-in feature (async TP, float8) cannot run on this accelerator or software stack."""


class CheckpointError(LightningTPError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


class CheckpointPathError(CheckpointError, FileExistsError):
    """A save would replace a file or directory the strategy did not write; nothing is touched. Also
    a ``FileExistsError`` (the parent raises ``IsADirectoryError``, an ``OSError`` too, for one of
    these cases)."""


class DataError(LightningTPError):
    """A corpus is missing, empty or too small, or a data parameter has an invalid value."""
