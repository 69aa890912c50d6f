"""What each precision and each activation-checkpointing mode costs, in the planner's terms.

The precisions and the modes themselves are the strategy's
(:data:`lightning_tp.config.PRECISIONS`, :data:`lightning_tp.config.AC_MODES`); this module owns
only the figures the planner attaches to each one, and refuses at import a table whose keys differ
from those lists, so a precision or mode added to the strategy fails here until the planner
describes it.
"""

from __future__ import annotations

from typing import NamedTuple

from lightning_tp.config import AC_MODES, PRECISIONS

__all__ = ["AC_BY_RECOMPUTE", "BYTES_PER_ELEMENT", "RECOMPUTE", "ElementBytes", "Recompute"]


class ElementBytes(NamedTuple):
    """Bytes per element of one parameter (and of activations) under one precision."""

    stored: int
    """The stored, sharded parameter (the fp32 master copy under ``bf16-mixed``)."""
    compute: int
    """The gathered copy matmuls read, and every activation."""
    grad: int
    """A gradient, and the reduce-scatter that averages it."""
    optimizer: int
    """AdamW's state: two moments."""


# bf16-mixed is the strategy's FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32
# master shards, bf16 all-gathered units, fp32 reduce-scatter and gradients.
BYTES_PER_ELEMENT: dict[str, ElementBytes] = {
    "bf16-mixed": ElementBytes(4, 2, 4, 8),
    "bf16-true": ElementBytes(2, 2, 2, 4),
    "16-true": ElementBytes(2, 2, 2, 4),
    "32-true": ElementBytes(4, 4, 4, 8),
}


class Recompute(NamedTuple):
    """What one activation-checkpointing mode runs again in each decoder layer's backward
    (see :mod:`lightning_tp.parallel.recompute`)."""

    gathers: int
    """Forward all-gathers repeated per layer under sequence parallelism (in front of attention and
    the MLP)."""
    reductions: int
    """Forward reduce-scatters (sequence parallel) or all-reduces (without) repeated per layer."""
    forward: bool
    """Whether every matmul of the layer's forward runs again."""

    @property
    def cost(self) -> tuple[bool, int]:
        """Sort key: a whole forward again costs most, then each repeated collective."""
        return self.forward, self.gathers + self.reductions


# selective keeps the colwise matmul outputs and the reduced o_proj/down_proj outputs, so it repeats
# only the all-gathers in front of attention and the MLP; full keeps only the block input.
RECOMPUTE: dict[str, Recompute] = {
    "none": Recompute(gathers=0, reductions=0, forward=False),
    "full": Recompute(gathers=2, reductions=2, forward=True),
    "selective": Recompute(gathers=2, reductions=0, forward=False),
}

AC_BY_RECOMPUTE: tuple[str, ...] = tuple(sorted(AC_MODES, key=lambda mode: RECOMPUTE[mode].cost))
"""The strategy's modes from the least recomputation to the most: none, selective, full."""


def _same_keys(table: dict[str, object], expected: tuple[str, ...], name: str) -> None:
    if set(table) != set(expected):
        raise RuntimeError(f"lightning_tp.planner.modes.{name} has keys {sorted(table)}, but the"
                           f" strategy's list is {sorted(expected)} (lightning_tp.config): describe"
                           " each entry here.")


_same_keys(BYTES_PER_ELEMENT, PRECISIONS, "BYTES_PER_ELEMENT")
_same_keys(RECOMPUTE, AC_MODES, "RECOMPUTE")
