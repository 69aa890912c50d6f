"""Tiny transformers models, one module per family, for ``tests/workers/families.py`` (issue 15).

Each module defines ``CASES``, a list of :class:`Case`. A case builds a small float32 model of its family that keeps
a real checkpoint's head ratios and naming (``build(layers)``, seeded, dropout off, ``eval()`` not required), and
lists the tp sizes it runs at. The worker runs every case of a launch's world size: our plan against one process
(logits, loss, every gradient), collectives per layer (1 vs 2 layers), and transformers' own tensor parallelism
side by side.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

SEQ, BATCH, VOCAB = 16, 2, 128  # the worker's inputs: (BATCH, SEQ) token ids below VOCAB


@dataclass(frozen=True)
class Case:
    name: str
    """Unique over all modules, e.g. ``"gemma2-8:4"``."""
    family: str
    """The registered family name its model must resolve to (lightning_tp.parallel.families)."""
    build: Callable[[int], nn.Module]
    """``build(num_hidden_layers)`` -> a fresh model, the same weights for the same argument."""
    tps: tuple[int, ...] = (2, 4, 8)
    """The tp sizes it runs at (8 runs 8 gloo processes, the launch that costs most: keep those models very small,
    and run at 8 the cases whose layout changes there, e.g. KV heads replicated from tp 8 on)."""
    extra_per_layer: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)
    """Collectives per layer beyond the Llama minimum (with SP: 2 all-gathers + 2 reduce-scatters forward and the
    same backward), by tp, then phase ("forward"/"backward"), then op name as CommDebugMode reports it, e.g.
    ``{4: {"backward": {"allreduce_": 2}}}``; a tp not listed means exactly the minimum. The family documents them."""


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases += importlib.import_module(f"{__name__}.{info.name}").CASES
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), names
    return cases
