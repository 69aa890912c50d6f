"""Fused column-parallel projections: one ``nn.Linear`` whose output rows are several projections
end to end (Phi-3's ``qkv_proj``: ``[q heads | k heads | v heads]``; ``gate_up_proj``:
``[gate | up]``), split so that each TP rank holds its own share of *every* part.

``ColwiseParallel`` would give rank ``r`` the ``r``-th contiguous block of the fused rows: at tp 2
for Phi-3-mini that is all of q and half of k on rank 0, which attention cannot use without an
all-to-all. :class:`FusedColwise` instead cuts each part into ``units`` equal pieces (a KV group
of heads for ``qkv_proj``: its query heads, its key head, its value head; one row of gate and of
up for ``gate_up_proj``) and stores the weight as a ``Shard(0)`` DTensor of the rows reordered unit
by unit (:func:`grouped_rows`). Every rank then holds whole units; in forward it reorders its
local rows back to ``[part 0 | part 1 | ...]`` (a local gather of the weight shard, no
communication), so the model's own split of the output (``chunk(2, dim=-1)``, or slicing by
local head counts) finds its q/k/v or gate/up.

Communication: exactly ``ColwiseParallel``'s (none of its own; the input gradient is a partial
sum reduced once at the attention / MLP boundary, with the Llama plan's ``PrepareModuleInput``).
Memory: the weight is divided by tp; forward keeps one reordered copy of the local shard.

Checkpoints: the stored weight is the fused weight with its rows in the grouped order, which
does not depend on tp, so a sharded checkpoint reshards to any tp this style accepts (weights
and optimizer moments alike). It is *not* the model's original row order: ``full_tensor()`` of
the weight or its gradient (and a consolidated checkpoint) holds ``original[grouped_rows]``;
:func:`original_rows` undoes it (``full[inverse]``), and :func:`restore_fused_rows` does so for a
state dict.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel

from lightning_tp.errors import ModelShapeError, PlanError
from lightning_tp.parallel.heads import _replicate, _select, head_layout, rank_heads

__all__ = ["FusedColwise", "FusedHeadsColwise", "grouped_rows", "original_rows",
           "restore_fused_rows"]


def grouped_rows(parts: tuple[int, ...], units: int) -> Tensor:
    """Row index ``g`` such that ``original[g]`` is the grouped order: for each unit ``u`` in turn,
    the ``u``-th piece of every part (each part cut into ``units`` equal pieces)."""
    starts = [sum(parts[:p]) for p in range(len(parts))]
    pieces = [n // units for n in parts]
    rows = [starts[p] + u * pieces[p] + t
            for u in range(units) for p in range(len(parts)) for t in range(pieces[p])]
    return torch.tensor(rows, dtype=torch.long)


def original_rows(parts: tuple[int, ...], units: int) -> Tensor:
    """Inverse of :func:`grouped_rows`: ``grouped[original_rows]`` is the model's own order."""
    return torch.argsort(grouped_rows(parts, units))


def _local_order(parts: tuple[int, ...], units: int, tp: int) -> Tensor:
    """Index into a rank's local (grouped) rows that gives ``[part 0 | part 1 | ...]`` locally."""
    local_units, pieces = units // tp, [n // units for n in parts]
    unit = sum(pieces)
    offsets = [sum(pieces[:p]) for p in range(len(parts))]
    rows = [u * unit + offsets[p] + t
            for p in range(len(parts)) for u in range(local_units) for t in range(pieces[p])]
    return torch.tensor(rows, dtype=torch.long)


class FusedColwise(ColwiseParallel):
    """Column-parallel ``nn.Linear`` whose output is ``parts`` (row counts, in order) fused; each
    part is cut into ``units`` pieces and tp must divide ``units``. ``what`` names the module and
    what a unit is, for errors."""

    def __init__(self, parts: tuple[int, ...], units: int, *, what: str = "fused projection"):
        super().__init__()
        if any(n % units for n in parts):
            raise PlanError(f"{what}: parts {parts} do not split into {units} equal units.")
        self.parts, self.units, self.what = tuple(parts), units, what

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp = device_mesh.size()
        if not isinstance(module, nn.Linear) or module.out_features != sum(self.parts):
            raise PlanError(f"{self.what}: FusedColwise needs an nn.Linear with"
                            f" {sum(self.parts)} output rows, got {module!r}.")
        if self.units % tp:
            raise ModelShapeError(
                f"{self.what} cannot be split over tensor_parallel_size={tp}: each rank needs"
                f" whole units of it and there are {self.units}. Fix: choose a"
                f" tensor_parallel_size that divides {self.units}.")
        rows = grouped_rows(self.parts, self.units)
        for name, param in list(module.named_parameters(recurse=False)):
            grouped = param.detach().index_select(0, rows.to(param.device))
            dist = distribute_tensor(grouped, device_mesh, [Shard(0)],
                                     src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(dist, param.requires_grad))
        module.__class__ = _fused_linear(type(module))
        module.local_order = _local_order(self.parts, self.units, tp)
        module.fused_parts, module.fused_units = self.parts, self.units
        return module

    def model_layout(self, name: str, full: Tensor) -> Tensor:
        """The full tensor ``name`` (``weight``/``bias``) as the parallelized module keeps it
        (rows grouped by unit), in the model's own row order (what an export writes)."""
        return full.index_select(0, original_rows(self.parts, self.units).to(full.device))


class FusedHeadsColwise(FusedColwise):
    """Phi-3's ``qkv_proj`` (``num_heads`` query, ``num_key_value_heads`` KV heads of
    ``head_dim``): split by whole KV groups when tp divides both head counts; otherwise (fewer KV
    heads than tp, or query heads tp does not divide) replicated, each rank computing the rows of
    its own query heads and of the KV heads they use
    (:func:`~lightning_tp.parallel.heads.rank_heads`), as ``q_proj``/``k_proj``/``v_proj`` do under
    the Llama plan. The replicated weight keeps the
    grouped row order too, so a checkpoint holds the same tensor at every tp and reshards between
    the two layouts. Cost when replicated: one all-reduce of the weight gradient per layer, in
    backward, and the weight not divided by tp."""

    def __init__(self, num_heads: int, num_key_value_heads: int, head_dim: int) -> None:
        q, kv = num_heads, num_key_value_heads
        super().__init__((q * head_dim, kv * head_dim, kv * head_dim), kv,
                         what="self_attn.qkv_proj")
        self.num_heads, self.num_key_value_heads, self.head_dim = q, kv, head_dim

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp, q, kv, d = device_mesh.size(), self.num_heads, self.num_key_value_heads, self.head_dim
        if not head_layout(q, kv, tp).kv_replicated:
            return super()._apply(module, device_mesh)
        if not isinstance(module, nn.Linear) or module.out_features != sum(self.parts):
            raise PlanError(f"{self.what}: FusedHeadsColwise needs an nn.Linear with"
                            f" {sum(self.parts)} output rows, got {module!r}.")
        grouped = grouped_rows(self.parts, self.units)
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(
                param.detach().index_select(0, grouped.to(param.device)), param.requires_grad))
        _replicate(self, module, device_mesh)
        query, key_value = rank_heads(q, kv, tp, device_mesh.get_local_rank())
        # rows of the model's own [q | k | v] order this rank computes, found in the grouped order
        wanted = ([h * d + t for h in query for t in range(d)]
                  + [(q + h) * d + t for h in key_value for t in range(d)]
                  + [(q + kv + h) * d + t for h in key_value for t in range(d)])
        position = original_rows(self.parts, self.units)
        return _select(module, device_mesh, position[wanted].tolist(), 0)


class _FusedLinear:
    """Forward of a :class:`FusedColwise` projection: the local shard, reordered part by part."""

    local_order: Tensor

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, DTensor) or x.placements != (Replicate(),):
            raise PlanError("A FusedColwise projection needs its input as a replicated DTensor"
                            " (PrepareModuleInput on its attention / MLP module), so that its"
                            " input gradient is reduced once at that boundary.")
        if self.local_order.device != self.weight.device:  # once, after materialisation
            self.local_order = self.local_order.to(self.weight.device)
        # The input gradient is this rank's partial sum, reduced at the module boundary.
        local = x.to_local(grad_placements=(Partial(),))
        weight = self.weight.to_local().index_select(0, self.local_order)
        bias = None if self.bias is None else self.bias.to_local().index_select(0, self.local_order)
        return F.linear(local, weight, bias)


@functools.cache
def _fused_linear(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (_FusedLinear, cls), {"__module__": __name__})


def restore_fused_rows(module: nn.Module, state_dict: dict[str, Tensor],
                       prefix: str = "") -> dict[str, Tensor]:
    """``state_dict`` (full tensors of ``module``'s parameters, names relative to ``module`` after
    ``prefix``) with the rows of every :class:`FusedColwise` weight and bias put back in the
    model's original order."""
    out = dict(state_dict)
    for path, child in module.named_modules():
        if not isinstance(child, _FusedLinear):
            continue
        inverse = original_rows(child.fused_parts, child.fused_units)
        for name in ("weight", "bias"):
            key = f"{prefix}{path}.{name}" if path else f"{prefix}{name}"
            if key in out:
                out[key] = out[key].index_select(0, inverse.to(out[key].device))
    return out
