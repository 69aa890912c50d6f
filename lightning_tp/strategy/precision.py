"""Mesh-aware gradient clipping for whichever precision plugin the Trainer chose.

Lightning clips through the precision plugin, with ``torch.nn.utils.clip_grad_norm_``, which
stacks per-parameter norms and fails once parameters sit on different device meshes (TP-only
parameters beside FSDP2 + TP ones). :func:`with_mesh_clipping` makes the plugin an instance of a
subclass of its own class whose two clipping methods use :mod:`lightning_tp.parallel.grad_norm`:
the plugin keeps its identity, its state and everything else its class does (dtype conversion,
autocast, scaler), and no method is assigned onto an instance.
"""

from __future__ import annotations

import functools
from typing import Any, Union

from lightning.pytorch.plugins.precision import Precision
from torch.optim import Optimizer

from lightning_tp.parallel.grad_norm import clip_grad_norm_, clip_grad_value_

__all__ = ["MeshClipping", "with_mesh_clipping"]


class MeshClipping:
    """Mixin placed before a ``Precision`` class: clipping by norm and by value over all meshes."""

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        clip_grad_norm_(self._params(optimizer), clip_val)

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        clip_grad_value_(self._params(optimizer), clip_val)

    @staticmethod
    def _params(optimizer: Optimizer) -> list[Any]:
        return [p for group in optimizer.param_groups for p in group["params"]]


@functools.cache
def _subclass(cls: type) -> type:
    return type(f"MeshClipping{cls.__name__}", (MeshClipping, cls), {"__module__": __name__})


def with_mesh_clipping(plugin: Precision) -> Precision:
    """``plugin``, now also a :class:`MeshClipping` (a no-op if it already is one)."""
    if not isinstance(plugin, MeshClipping):
        plugin.__class__ = _subclass(type(plugin))
    return plugin
