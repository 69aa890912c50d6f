"""The parallel configuration: every size and mode of the strategy, its validation and "auto"
resolution, once.

:class:`TensorParallelStrategy <lightning_tp.strategy.TensorParallelStrategy>` builds one from its
arguments, the recipes' Hydra schema is generated from the strategy's signature, and the dry-run
planner evaluates one, so a rule about sizes or modes lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

from lightning_tp.errors import MeshConfigError, PrecisionConfigError

__all__ = [
    "AC_MODES",
    "GRID_REFUSES",
    "LAUNCHERS",
    "PRECISIONS",
    "ActivationCheckpointing",
    "Launcher",
    "ParallelConfig",
    "Precision",
    "Size",
    "check_precision",
    "grid_problems",
    "split_grid",
]

Size = Union[Literal["auto"], int]
ActivationCheckpointing = Literal["none", "full", "selective"]
Launcher = Literal["auto", "subprocess", "fork"]
Precision = Literal["32-true", "bf16-mixed", "bf16-true", "16-true"]

AC_MODES: tuple[str, ...] = get_args(ActivationCheckpointing)
LAUNCHERS: tuple[str, ...] = get_args(Launcher)
PRECISIONS: tuple[str, ...] = get_args(Precision)
"""``Trainer(precision=...)`` values the strategy trains with; ``bf16-mixed`` computes in bf16 and
reduces gradients in fp32 (FSDP2's mixed-precision policy)."""

_FLAGS = ("sequence_parallel", "loss_parallel", "fsdp", "reshard_after_forward", "compile",
          "async_tp", "float8", "save_sharded_inputs")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is parallelized: the mesh sizes and the modes applied to it (see the strategy's
    arguments)."""

    tensor_parallel_size: Size = "auto"
    data_parallel_size: Size = "auto"
    sequence_parallel: bool = True
    loss_parallel: bool = True
    fsdp: bool = True
    reshard_after_forward: bool = True
    activation_checkpointing: ActivationCheckpointing = "none"
    compile: bool = False
    async_tp: bool = False
    float8: bool = False
    save_sharded_inputs: bool = False
    """Under SP, keep each block input's sequence shard for backward and all-gather it again there
    (:mod:`lightning_tp.parallel.sharded_saves`); without recompute only."""
    grid: Optional[tuple[int, int]] = None
    """2D tensor parallelism: the TP group as ``(r, c)`` rows × columns, ``r·c`` =
    ``tensor_parallel_size`` (:mod:`lightning_tp.parallel.grid`); ``None``: 1D."""

    def __post_init__(self) -> None:
        problems = self.problems(**{f.name: getattr(self, f.name)
                                    for f in dataclasses.fields(self)})
        if problems:
            raise MeshConfigError("Invalid ParallelConfig: " + "; ".join(problems) + ".")

    @staticmethod
    def problems(**fields: object) -> list[str]:
        """One message per invalid field value (each naming the value and the fix); empty when all
        are valid."""
        problems = []
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = fields.get(name, "auto")
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool)
                                    or value < 1):
                problems.append(f"`{name}` must be 'auto' or a positive int, got {value!r} (fix:"
                                " pass e.g. 2, or 'auto')")
        for name in _FLAGS:
            value = fields.get(name, False)
            if not isinstance(value, bool):
                problems.append(f"`{name}` must be a bool, got {value!r} (fix: pass True or False)")
        mode = fields.get("activation_checkpointing", "none")
        if mode not in AC_MODES:
            problems.append("`activation_checkpointing` must be one of"
                            f" {', '.join(map(repr, AC_MODES))}, got {mode!r}")
        if fields.get("async_tp") is True and fields.get("compile") is False:
            problems.append("`async_tp=True` needs `compile=True`: the collective/matmul overlap is"
                            " done by the compiler; set compile=True or async_tp=False")
        if fields.get("save_sharded_inputs") is True:
            needs = [f"{name}={fields[name]!r}" for name, value in (
                ("sequence_parallel", True), ("activation_checkpointing", "none"),
                ("compile", False)) if fields.get(name, value) != value]
            if needs:
                problems.append(
                    f"`save_sharded_inputs=True` applies with sequence_parallel=True,"
                    f" activation_checkpointing='none' and compile=False, got {', '.join(needs)}"
                    " (without SP nothing is gathered; 'selective' regathers these inputs itself,"
                    " 'full' keeps only the block input; a compiled block decides its own saves);"
                    " set save_sharded_inputs=False")
        problems += grid_problems(fields)
        dp = fields.get("data_parallel_size", "auto")
        if fields.get("fsdp") is False and isinstance(dp, int) and dp > 1:
            problems.append(f"`fsdp=False` needs `data_parallel_size=1` (got {dp}): gradients of"
                            " data-parallel replicas are synchronised by FSDP2; set fsdp=True")
        return problems

    def resolve(self, world_size: int, num_nodes: int = 1) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)`` on ``world_size`` devices over
        ``num_nodes`` nodes.

        ``"auto"`` for both: TP over the devices of one node, data parallel across nodes. One
        ``"auto"``: the world size divided by the other. Raises :class:`MeshConfigError` when the
        product is not the world size.
        """
        per_node = world_size // num_nodes
        dp, tp = self.data_parallel_size, self.tensor_parallel_size
        if self.grid is not None:
            tp = self.grid[0] * self.grid[1]
        if dp == "auto" and tp == "auto":
            dp, tp = num_nodes, per_node
        elif dp == "auto":
            dp = world_size // tp if world_size % tp == 0 else 0
        elif tp == "auto":
            tp = world_size // dp if world_size % dp == 0 else 0
        if not dp or not tp or dp * tp != world_size:
            raise MeshConfigError(
                f"data_parallel_size ({self.data_parallel_size}) and tensor_parallel_size"
                f" ({self.tensor_parallel_size}) multiplied should equal the world size"
                f" {world_size} (num_nodes={num_nodes} × devices={per_node}). Fix: choose sizes"
                f" whose product is {world_size}, or leave one of them 'auto'."
            )
        if not self.fsdp and dp > 1:
            raise MeshConfigError(f"`fsdp=False` needs data_parallel_size=1, but {world_size}"
                                  f" devices give {dp}; set fsdp=True or tensor_parallel_size to"
                                  " the world size.")
        return int(dp), int(tp)


def split_grid(size: object) -> tuple[object, Optional[tuple[int, int]]]:
    """``tensor_parallel_size`` as given → ``(the TP size, the grid or None)``: ``(2, 4)`` or
    ``[2, 4]`` (a list, as Hydra passes it) → ``(8, (2, 4))``; an int or ``"auto"`` is 1D. A
    malformed grid comes back as given, for :func:`grid_problems` to name."""
    if isinstance(size, (str, int)) or not hasattr(size, "__iter__"):
        return size, None
    grid = tuple(size)  # type: ignore[call-overload]
    if len(grid) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                              for n in grid):
        return grid[0] * grid[1], (int(grid[0]), int(grid[1]))
    return "auto", grid  # type: ignore[return-value]


GRID_REFUSES = {"sequence_parallel": False, "save_sharded_inputs": True, "compile": True,
                "async_tp": True, "float8": True, "activation_checkpointing": "selective"}
"""The modes a 2D grid does not combine with, and the value it refuses: the grid always splits the
residual stream over its rows (no 1D-style "TP only"); the sharded saves, the selective policy, the
compiled blocks and float8 are written for 1D's collectives (untested on the grid's)."""


def grid_problems(fields: dict[str, object]) -> list[str]:
    """What is wrong with ``fields["grid"]`` and the modes given with it (empty when fine or no
    grid)."""
    grid = fields.get("grid")
    if grid is None:
        return []
    if (not isinstance(grid, tuple) or len(grid) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
        return [f"a 2D `tensor_parallel_size` must be two positive ints (rows, columns), got"
                f" {grid!r} (fix: e.g. tensor_parallel_size=(2, 2), or an int for 1D)"]
    rows, cols = grid
    problems = []
    tp = fields.get("tensor_parallel_size", "auto")
    if tp not in ("auto", rows * cols):
        problems.append(f"`tensor_parallel_size` {tp!r} is not the grid's {rows}×{cols} ="
                        f" {rows * cols}")
    refused = [f"{name}={fields[name]!r}" for name, value in GRID_REFUSES.items()
               if name in fields and fields[name] == value]
    if refused:
        problems.append(
            f"2D tensor parallelism (tensor_parallel_size=({rows}, {cols})) does not combine with"
            f" {', '.join(refused)} (fix: drop those options, or pass an int tensor_parallel_size"
            " for 1D, which supports them)")
    return problems


def check_precision(precision: str, owner: str = "TensorParallelStrategy") -> None:
    """Raise :class:`PrecisionConfigError` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise PrecisionConfigError(
            f"{owner} does not support `Trainer(precision={precision!r})`. Choose one of"
            f" {', '.join(PRECISIONS)}; 'bf16-mixed' computes in bf16 and reduces gradients in"
            " fp32."
        )
