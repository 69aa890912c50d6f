"""2D tensor parallelism in the planner: what a grid ``(r, c)`` of ``t = r·c`` TP devices can be
combined with, and the collectives one decoder layer runs under it (docs/2d.md).

Below the inputs, which validate a grid with :func:`grid_problems` (one message per problem, each
naming the value and the fix): the modes a grid refuses are the strategy's own rule
(:func:`lightning_tp.config.grid_problems`); the shapes it must divide are
:data:`lightning_tp.parallel.grid.GRID_SPLITS`, which the strategy checks on a built model, here on
the config's fields (the planner has no model of a checkpoint's family before it builds one), with
:data:`GRID_FAMILIES`. :func:`layer_terms` gives the per-layer collectives of the
weight-stationary layout, in elements each device sends, for any ``(r, c)``; ``c = 1`` gives the
1D sequence-parallel layer the planner counts (2 all-gathers + 2 reduce-scatters each way).

Grid ranks are ``i·c + j`` (row ``i``, column ``j``): the ``c`` devices of a row group ("C",
reduce/gather over the columns) are consecutive, the ``r`` devices of a column group ("R") are ``c``
apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_tp.config import grid_problems as strategy_grid_problems
from lightning_tp.parallel.grid import GRID_SPLITS, grid_divisor

__all__ = ["GRID_FAMILIES", "LayerTerm", "grid_problems", "grids", "layer_terms"]

GRID_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")
"""``model_type`` of the Hugging Face families the 2D layout shards (Llama-shaped blocks without
q/k norms); a preset is the native Llama."""

def grid_problems(grid: tuple[int, int], tp: int, *, hidden: int | None = None,
                  intermediate: int | None = None, heads: int | None = None,
                  kv_heads: int | None = None, seq_len: int | None = None, lora: bool = False,
                  family: str | None = None, **flags: Any) -> list[str]:
    """One message per reason the 2D layout ``grid = (r, c)`` cannot run (empty when it can): the
    product is not ``tp``; a mode it cannot combine with (``flags``: the strategy's fields, checked
    by :func:`lightning_tp.config.grid_problems`), ``lora``, a ``family`` outside
    :data:`GRID_FAMILIES`; a shape it does not divide: query and KV heads by ``r·c`` (each device
    computes whole heads), ``hidden`` by ``c`` (residual ``[b, s/r, h/c]``, norm weights),
    ``intermediate`` by ``r·c`` (gate/up outputs ``F/(r·c)``), ``seq_len`` by ``r``; a shape left
    None is not checked."""
    r, c = grid
    name = f"strategy.tensor_parallel_size=[{r},{c}]"
    if r * c != tp:
        return [f"{name}: r*c={r * c} is not the TP size {tp}; give a grid whose product is {tp}"]
    problems = [f"{name}: {p}" for p in strategy_grid_problems(
        {"grid": (r, c), "tensor_parallel_size": tp, **flags})]
    if lora:
        problems.append(f"{name} cannot combine with LoRA/PEFT adapters (peft=lora): use peft=none"
                        f" or a 1D tensor_parallel_size={tp}")
    if family is not None and family not in GRID_FAMILIES:
        problems.append(f"{name}: model_type {family!r} is not one the 2D layout shards"
                        f" ({', '.join(GRID_FAMILIES)}); use a 1D tensor_parallel_size={tp}")
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": hidden,
             "intermediate_size": intermediate}

    def misses(g: tuple[int, int]) -> list[tuple[str, int, int]]:
        """(field, value, divisor) of each given shape the grid ``g`` does not divide."""
        checks = [(attr, sizes[attr], grid_divisor(over, g)) for attr, over in GRID_SPLITS]
        return [(what, value, by) for what, value, by in [*checks, ("data.seq_len", seq_len, g[0])]
                if value is not None and value % by]

    for what, value, by in misses(grid):
        fits = [f"[{a},{tp // a}]" for a in range(1, tp + 1)
                if tp % a == 0 and not misses((a, tp // a))]
        fix = (f"grids of {tp} that divide the model: {', '.join(fits)}" if fits
               else f"no grid of {tp} divides this model; use a smaller tensor_parallel_size")
        problems.append(f"{name}: {what}={value} is not divisible by {by}; {fix}")
    return problems


def grids(tp: int) -> list[tuple[int, int]]:
    """Every 2D grid ``(r, c)`` of ``tp`` devices with both sides above 1, rows first."""
    return [(r, tp // r) for r in range(tp - 1, 1, -1) if tp % r == 0 and tp // r > 1]


@dataclass(frozen=True)
class LayerTerm:
    """One collective of a decoder layer per micro-batch on one device."""

    name: str
    kind: str
    """all_gather | reduce_scatter | all_reduce."""
    axis: str
    """'R' (the ``r`` devices of a grid column), 'C' (the ``c`` devices of a grid row) or 'RC' (all
    ``r·c``, the flattened TP mesh)."""
    calls: int
    elements: float
    """Elements of one call's whole (gathered / reduced) tensor."""
    fp32: bool = False
    """Norm statistics (fp32) instead of the activation dtype."""

    def group_size(self, r: int, c: int) -> int:
        return {"R": r, "C": c, "RC": r * c}[self.axis]

    def sent(self, r: int, c: int) -> float:
        """Elements each device sends for all ``calls``: ring ``(n−1)/n`` of the whole tensor,
        twice for an all-reduce."""
        n = self.group_size(r, c)
        return self.calls * (2 if self.kind == "all_reduce" else 1) * (n - 1) / n * self.elements


def layer_terms(tokens: int, hidden: int, q_width: int, kv_width: int, intermediate: int,
                r: int, c: int, recompute: bool = False) -> list[LayerTerm]:
    """The collectives of one decoder layer, forward and backward, per micro-batch, under the grid
    ``(r, c)``: ``T = tokens`` (b·s), ``h = hidden``, ``q = q_width`` (heads·head_dim), ``k =
    kv_width``, ``F = intermediate``. ``recompute`` (full activation checkpointing): the forward's
    collectives once more in backward. Collectives over a group of one device are left out, so
    ``c = 1`` gives the 1D SP layer (4 + 4 calls of ``T·h``).

    Forward (docs/2d.md): all-gather over R of both block inputs (``[b, s, h/c]``), reduce-scatter
    over C of q, k, v and of gate, up (``[b, s, out/r]`` partial sums), all-gather over C of the
    attention output and of the activation product (o_proj's and down's inputs ``[b, s, q/r]``,
    ``[b, s, F/r]``), reduce-scatter over R of both block outputs (``[b, s, h/c]`` partial over R),
    and the two norms' sum of squares all-reduced over C (``T/r`` fp32). Backward: each
    all-gather's input gradient is a reduce-scatter over the same group and vice versa, the norm
    statistics' gradient all-reduced again. The norm weights' gradients (partial sums over R) are
    reduced with the other gradients once per step, as 1D's are, and not counted here (docs/2d.md:
    the per-layer collectives ``CommDebugMode`` counts are these, 13 forward and 13 backward at
    ``r, c > 1``).
    """
    t_r = tokens / r
    forward = [
        ("block inputs (attention, MLP)", "all_gather", "R", 2, tokens * hidden / c),
        ("q output", "reduce_scatter", "C", 1, t_r * q_width),
        ("k, v outputs", "reduce_scatter", "C", 2, t_r * kv_width),
        ("attention output (o_proj input)", "all_gather", "C", 1, t_r * q_width),
        ("gate, up outputs", "reduce_scatter", "C", 2, t_r * intermediate),
        ("activation product (down input)", "all_gather", "C", 1, t_r * intermediate),
        ("block outputs (o_proj, down)", "reduce_scatter", "R", 2, tokens * hidden / c),
    ]
    mirror = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather"}
    out: list[LayerTerm] = []
    passes = [("fwd", False), ("bwd", True)] + ([("recompute", False)] if recompute else [])
    for phase, backward in passes:
        for name, kind, axis, calls, elements in forward:
            out.append(LayerTerm(f"{name} ({phase})", mirror[kind] if backward else kind, axis,
                                 calls, elements))
        out.append(LayerTerm(f"norm statistics ({phase})", "all_reduce", "C", 2, t_r, fp32=True))
    return [x for x in out if x.group_size(r, c) > 1]
