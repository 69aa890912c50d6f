"""Plain tensors out of DTensors, at the boundaries where user code and Lightning expect them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.distributed.tensor import DTensor

__all__ = ["full", "full_outputs"]


def full(value: Any) -> Any:
    """The global value of a DTensor as a plain tensor (differentiable; no communication when it
    is replicated, an all-reduce when it holds partial sums, an all-gather when it is sharded);
    anything else unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_outputs(output: Any) -> Any:
    """:func:`full` on a step's output: a loss, or a mapping of them (what ``training_step`` may
    return), so that Lightning logs and reduces plain tensors."""
    if isinstance(output, Mapping):
        return {k: full_outputs(v) for k, v in output.items()}
    return full(output)
