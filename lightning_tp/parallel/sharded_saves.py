"""Sequence-parallel block inputs kept as this rank's sequence shard for backward and all-gathered
again when backward needs them (Megatron's choice), instead of kept whole.

Under sequence parallelism each decoder block's ``PrepareModuleInput`` all-gathers the
sequence-sharded norm output before ``self_attn`` and before ``mlp``. The column-parallel
projections behind it (q, k, v; gate, up) save that gathered tensor for their weight gradients, so
DTensor keeps two ``b·s·h`` tensors per layer, the same on every rank: ``4·s·b·h`` bytes in 16 bits
that do not shrink with tp while everything else does (``docs/performance.md``).

:func:`save_sharded_inputs` runs the forward of each gathering module inside a decoder block under
``torch.autograd.graph.saved_tensors_hooks``. A saved tensor that is a view of a gathered input is
packed as the gather's own input, the rank's shard, which the norm produced anyway; the first
unpack in backward all-gathers the shard again, and every projection that saved a view of the same
input shares that one gather. Every other saved tensor passes through untouched.

What it saves and costs per decoder layer (``a`` bytes per activation element, ``t`` = tp):

* memory: ``2·a·s·b·h·(1 − 1/t)`` less kept from forward to backward; during each module's
  backward its gathered input exists again (``a·s·b·h``, as in forward);
* communication: 2 more all-gathers in backward (``s·b·h·(t−1)/t`` elements sent each), issued
  when the first projection's backward needs its input, so not overlapped with compute: 4
  all-gathers + 2 reduce-scatters in backward instead of 2 + 2, ``10·s·b·h·(t−1)/t`` elements per
  layer in all instead of 8.

The values regathered are those gathered in forward (the same shard, the same collective), so the
gradients are bit for bit the default's. Ranks unpack in the order their autograd engines run the
backward nodes, the same on every rank of a TP group, as for the backward's other collectives.
``"selective"`` recompute already regathers these inputs and ``"full"`` keeps only the block input,
so the option applies without recompute (:class:`~lightning_tp.config.ParallelConfig` checks it).
Inside the wrapped modules these hooks are the innermost, so they take precedence over saved-tensor
hooks entered around the model, as ``torch.utils.checkpoint``'s do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput

from lightning_tp.errors import PlanError
from lightning_tp.parallel.plans import ResolvedPlan

__all__ = ["gathering_inputs", "save_sharded_inputs"]

_MARK = "_lightning_tp_sharded_saves"

# An input position of a module: an int for a positional argument, a str for a keyword argument.
Position = Any


def gathering_inputs(style: Any) -> dict[Position, Shard]:
    """The inputs ``style`` all-gathers (a ``PrepareModuleInput`` from ``Shard(d)`` to
    ``Replicate()``), by position or keyword, with the placement they arrive in."""
    if not isinstance(style, PrepareModuleInput):
        return {}
    found: dict[Position, Shard] = {}
    pairs = zip(style.input_layouts or (), style.desired_input_layouts or (), strict=True)
    for position, (given, desired) in enumerate(pairs):
        if isinstance(given, Shard) and isinstance(desired, Replicate):
            found[position] = given
    for key, given in style.input_kwarg_layouts.items():
        if isinstance(given, Shard) and isinstance(style.desired_input_kwarg_layouts.get(key),
                                                   Replicate):
            found[key] = given
    return found


@dataclass
class _Gathered:
    """One gathered input of one forward: its shard and what the regather must reproduce."""

    shard: DTensor  # the gather's input (made a DTensor if it came as the local tensor)
    given: torch.Tensor  # the input as the module received it, whose version counters are checked
    versions: tuple[int, ...]
    placements: tuple[Any, ...]  # of the gathered DTensor
    local: Optional[torch.Tensor]  # the gathered local tensor, until the module's forward returns
    size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    offset: int = 0
    saves: int = 0  # views packed in forward
    pending: int = 0  # views still to unpack in this backward
    regathered: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        assert self.local is not None
        self.size, self.stride = tuple(self.local.shape), tuple(self.local.stride())
        self.offset = self.local.storage_offset()

    def regather(self) -> torch.Tensor:
        """The gathered local tensor again (one all-gather), with the layout it had in forward."""
        if _versions(self.given) != self.versions:
            raise RuntimeError(
                "save_sharded_inputs: a sequence shard kept for backward was modified in place"
                " after forward, so its gather cannot be repeated. Fix: do not modify a norm's"
                " output in place, or pass save_sharded_inputs=False."
            )
        with torch.no_grad():
            local = self.shard.redistribute(self.shard.device_mesh, self.placements).to_local()
        assert (tuple(local.shape), tuple(local.stride())) == (self.size, self.stride), (
            "the regathered input's layout differs from forward's")
        return local


@dataclass
class _Saved:
    """What a saved view of a gathered input is packed as: which input, and the view's layout."""

    source: _Gathered
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # from the start of the gathered local tensor
    spec: Optional[tuple[Any, Any, tuple[int, ...], tuple[int, ...]]]  # DTensor: mesh, placements,
    # global shape and stride; None for a plain tensor


def _local(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, DTensor):
        return x
    with torch.no_grad():
        return x.to_local()


def _versions(x: torch.Tensor) -> tuple[int, ...]:
    """The version counters an in-place change of ``x`` advances: its own and, for a DTensor, its
    local tensor's (what an in-place op on ``to_local()`` changes)."""
    return (x._version, _local(x)._version) if isinstance(x, DTensor) else (x._version,)


def _pack(marks: dict[int, _Gathered], x: torch.Tensor) -> Any:
    local = _local(x)
    source = marks.get(local.untyped_storage().data_ptr()) if local.numel() else None
    if source is None:
        return x
    source.saves += 1
    source.pending += 1
    spec = ((x.device_mesh, x.placements, tuple(x.shape), tuple(x.stride()))
            if isinstance(x, DTensor) else None)
    return _Saved(source, tuple(local.shape), tuple(local.stride()),
                  local.storage_offset() - source.offset, spec)


def _unpack(packed: Any) -> torch.Tensor:
    if not isinstance(packed, _Saved):
        return packed
    source = packed.source
    if source.regathered is None:
        source.regathered = source.regather()
    full = source.regathered
    source.pending -= 1
    if source.pending == 0:  # the last view of this backward: free the gathered copy
        source.regathered, source.pending = None, source.saves
    view = full.as_strided(packed.size, packed.stride, full.storage_offset() + packed.offset)
    if packed.spec is None:
        return view
    mesh, placements, shape, stride = packed.spec
    with torch.no_grad():
        return DTensor.from_local(view, mesh, placements, run_check=False, shape=shape,
                                  stride=stride)


@dataclass
class _Gathers:
    """The gathering inputs of one module and, between its pre-hook and its forward, their
    shards."""

    inputs: dict[Position, Shard]
    mesh: Any
    shards: dict[Position, tuple[DTensor, torch.Tensor]] = field(default_factory=dict)

    def _values(self, args: tuple, kwargs: dict) -> Iterator[tuple[Position, Any]]:
        for position in self.inputs:
            if isinstance(position, int) and position < len(args):
                yield position, args[position]
            elif isinstance(position, str) and position in kwargs:
                yield position, kwargs[position]

    def note_shards(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook that runs before the style's own: keep the inputs it is about to gather."""
        self.shards.clear()
        for position, value in self._values(args, kwargs):
            if isinstance(value, DTensor):
                self.shards[position] = (value, value)
            elif isinstance(value, torch.Tensor):
                with torch.no_grad():
                    shard = DTensor.from_local(value, self.mesh, (self.inputs[position],),
                                               run_check=False)
                self.shards[position] = (shard, value)

    def marks(self, args: tuple, kwargs: dict) -> dict[int, _Gathered]:
        """The gathered inputs the forward received, keyed by their storage."""
        marks: dict[int, _Gathered] = {}
        for position, value in self._values(args, kwargs):
            if position not in self.shards or not isinstance(value, torch.Tensor):
                continue
            shard, given = self.shards[position]
            local = _local(value)
            key = local.untyped_storage().data_ptr()
            if not local.numel() or key == _local(shard).untyped_storage().data_ptr():
                continue  # nothing was gathered (one rank)
            placements = (value.placements if isinstance(value, DTensor)
                          else (Replicate(),) * shard.device_mesh.ndim)
            marks[key] = _Gathered(shard, given, _versions(given), tuple(placements), local)
        self.shards.clear()
        return marks


def _saving_shards(forward: Callable[..., Any], gathers: _Gathers) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        marks = gathers.marks(args, kwargs)
        if not marks or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        try:
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, marks), _unpack):
                return forward(*args, **kwargs)
        finally:
            for gathered in marks.values():
                gathered.local = None  # the gathered tensor is not kept past forward
            marks.clear()

    return run


def save_sharded_inputs(module: nn.Module, plan: ResolvedPlan, tp_mesh: Any) -> list[str]:
    """Keep the sequence shard of every input a ``PrepareModuleInput`` of ``plan`` all-gathers
    inside a decoder block, and regather it in backward; returns the module paths changed.

    Call after :func:`~lightning_tp.parallel.parallelize.apply_tensor_parallel` (the styles' own
    hooks must be installed) and without activation checkpointing. Raises :class:`PlanError` when
    the plan gathers nothing inside its blocks (sequence parallelism off, or a plan of the user's
    own without ``PrepareModuleInput``).
    """
    inside = tuple(f"{block}." for block in plan.blocks)
    paths = [path for path, style in plan.styles.items()
             if path.startswith(inside) and gathering_inputs(style)]
    if not paths:
        raise PlanError(
            "save_sharded_inputs=True found no input that the plan all-gathers inside a decoder"
            f" block (blocks {list(plan.blocks)[:2]}...): it needs sequence_parallel=True and a"
            " plan whose PrepareModuleInput gathers Shard(d) inputs to Replicate() before"
            " self_attn/mlp. Fix: pass sequence_parallel=True, or save_sharded_inputs=False."
        )
    for path in paths:
        target = module.get_submodule(path)
        if getattr(target, _MARK, False):
            raise RuntimeError(f"{path} already saves sharded inputs; apply it once.")
        gathers = _Gathers(gathering_inputs(plan.styles[path]), tp_mesh)
        target.register_forward_pre_hook(gathers.note_shards, with_kwargs=True, prepend=True)
        target.forward = _saving_shards(target.forward, gathers)
        setattr(target, _MARK, True)
    return paths
