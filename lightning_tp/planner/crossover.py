"""Where 2D tensor parallelism beats 1D: bytes and TP communication time per decoder layer on the
named cluster, over tp, the model's shapes and tokens per micro-batch (docs/2d.md, "Planner: when
2D wins").

Owns :class:`GridComparison`, :func:`compare_grid` (one grid against 1D at the same tp),
:func:`compare_2d` (the table ``lightning-tp plan compare_2d=true`` prints), :func:`bytes_ratio`
(the closed form of the 2D/1D elements, independent of the tokens), :func:`tp_step_seconds` and
:func:`step_crossover_tokens` (the whole step's TP time, embedding and lm_head included) and
:func:`choose_grid` (the grid the recommendation takes at one tp, or 1D and why).

Time per layer is the planner's alpha-beta model (:func:`~.communication.grid_layer_collectives`):
``bytes / (bandwidth·efficiency) + calls·latency`` on each group's link, so it is ``A + B·T`` in
the tokens ``T`` of a micro-batch. 2D makes more calls (``A`` larger); where it moves fewer bytes
per token (``B`` smaller) it wins above ``T* = (A_2D − A_1D) / (B_1D − B_2D)`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lightning_tp.models.config import LlamaConfig, get_config
from lightning_tp.planner.communication import grid_layer_collectives
from lightning_tp.planner.grid import grid_problems, grids
from lightning_tp.planner.inputs import PlanInputs

__all__ = ["COMPARED_MODELS", "COMPARED_TP", "GridComparison", "bytes_ratio", "choose_grid",
           "compare_2d", "compare_grid", "step_crossover_tokens", "tp_step_seconds"]

COMPARED_TP: tuple[int, ...] = (4, 8, 16)
COMPARED_MODELS: tuple[str, ...] = ("llama3_1b", "llama3_8b", "llama3_70b")
"""The presets whose shapes :func:`compare_2d` spans (h 2048, 4096, 8192)."""


def bytes_ratio(hidden: int, kv_width: int, intermediate: int, r: int, c: int,
                q_width: Optional[int] = None) -> float:
    """2D/1D elements per device per layer (forward + backward, large terms), docs/2d.md:
    ``[4h(r−1) + (c−1)(h + q + 2k + 3F)] / [4h(t−1)]`` with ``q = h`` for Llama."""
    h, q, t = hidden, hidden if q_width is None else q_width, r * c
    big = 4 * h * (r - 1) + (c - 1) * (h + q + 2 * kv_width + 3 * intermediate)
    return big / (4 * h * (t - 1))


@dataclass(frozen=True)
class GridComparison:
    """One grid against 1D at the same tp, per decoder layer per micro-batch (forward and
    backward, recomputation included)."""

    model: str
    hidden: int
    tp: int
    grid: tuple[int, int]
    tokens: int
    """Tokens per micro-batch (b·s) the bytes and times are for."""
    bytes_ratio: float
    """2D/1D of the large terms (:func:`bytes_ratio`; independent of the tokens)."""
    sent_1d: float
    sent_2d: float
    """Bytes one device sends, all terms."""
    calls_1d: int
    calls_2d: int
    time_1d_s: float
    time_2d_s: float
    links: str
    """The links of R and C (``R nvlink4, C nvlink4``); 1D runs on R's for ``(tp, 1)``."""
    crossover_tokens: Optional[float]
    """Tokens per micro-batch above which 2D takes less time; 0: at any; None: at none."""
    refused: str = ""
    """Why the 2D layout cannot run this model with these inputs (empty: it can)."""

    @property
    def wins_bytes(self) -> bool:
        return self.sent_2d < self.sent_1d

    @property
    def wins_time(self) -> bool:
        return self.time_2d_s < self.time_1d_s


def _line(inputs: PlanInputs, grid: tuple[int, int]) -> tuple[float, float, float, int]:
    """``(A, B, bytes at inputs.tokens, calls)`` of one layer: time ``A + B·T`` seconds."""
    at0 = grid_layer_collectives(inputs, grid, tokens=0)
    at1 = grid_layer_collectives(inputs, grid, tokens=1)
    here = grid_layer_collectives(inputs, grid)
    a = sum(x.seconds for x in at0)
    return (a, sum(x.seconds for x in at1) - a, sum(x.bytes_per_rank for x in here),
            sum(x.calls for x in here))


def compare_grid(inputs: PlanInputs, grid: tuple[int, int]) -> GridComparison:
    """``grid`` against 1D at tp = r·c on ``inputs``' links, precision, checkpointing and
    tokens (the inputs' own tp and grid do not matter)."""
    from lightning_tp.planner.communication import grid_link

    r, c = grid
    tp, cfg = r * c, inputs.config
    d = cfg.resolved_head_dim
    a1, b1, sent1, calls1 = _line(inputs, (tp, 1))
    a2, b2, sent2, calls2 = _line(inputs, grid)
    if b2 < b1:
        cross: Optional[float] = max(0.0, (a2 - a1) / (b1 - b2))
    else:
        cross = 0.0 if a2 < a1 else None
    refused = grid_problems(
        grid, tp, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, seq_len=inputs.seq_len,
        lora=inputs.lora is not None, sequence_parallel=inputs.sequence_parallel,
        save_sharded_inputs=inputs.save_sharded_inputs, compile=inputs.compile,
        async_tp=inputs.async_tp, float8=inputs.float8,
        activation_checkpointing=inputs.activation_checkpointing)
    t = inputs.tokens
    return GridComparison(
        inputs.model_name, cfg.hidden_size, tp, grid, t,
        bytes_ratio(cfg.hidden_size, cfg.num_key_value_heads * d, cfg.intermediate_size, r, c,
                    cfg.num_attention_heads * d),
        sent1, sent2, calls1, calls2, a1 + b1 * t, a2 + b2 * t,
        f"R {grid_link(inputs, 'R', grid).name}, C {grid_link(inputs, 'C', grid).name}",
        cross, "; ".join(refused))


def _at(inputs: PlanInputs, name: str, config: LlamaConfig) -> PlanInputs:
    """``inputs`` with another model, at 1D tp 1 (what :func:`compare_grid` reads of them are the
    links, precision, checkpointing and tokens)."""
    return inputs.replace(config=config, model_name=name, tp=1, dp=1, grid=None,
                          save_sharded_inputs=False, async_tp=False, checkpoint=None)


def compare_2d(inputs: PlanInputs, tps: tuple[int, ...] = COMPARED_TP,
               models: Optional[tuple[str, ...]] = None) -> list[GridComparison]:
    """Every grid with both sides above 1 at each tp of ``tps``, against 1D, for the presets
    ``models`` (default :data:`COMPARED_MODELS` and ``inputs``' own model), on ``inputs``' cluster
    and tokens."""
    configs = [(inputs.model_name, inputs.config)]
    for name in models if models is not None else COMPARED_MODELS:
        if name != inputs.model_name:
            configs.append((name, get_config(name)))
    configs.sort(key=lambda nc: nc[1].hidden_size)
    return [compare_grid(_at(inputs, name, config), grid)
            for name, config in configs for tp in tps for grid in grids(tp)]


def tp_step_seconds(inputs: PlanInputs, grid: Optional[tuple[int, int]]) -> float:
    """TP communication seconds per optimizer step of ``inputs`` as 1D (``grid=None``) or on
    ``grid``: every TP row of :func:`~.communication.collectives` (layers, embedding, lm_head,
    loss), what the step time adds for TP."""
    from lightning_tp.planner.communication import collectives

    return sum(x.seconds for x in collectives(inputs.replace(grid=grid)) if x.group == "tp")


def step_crossover_tokens(inputs: PlanInputs, grid: tuple[int, int]) -> Optional[float]:
    """Tokens per micro-batch above which ``grid``'s TP time per step is below 1D's (0: at any,
    None: at none); both are ``A + B·T`` in the tokens, read at ``inputs``' and twice as many."""
    t = inputs.tokens
    twice = inputs.replace(batch_size=2 * inputs.batch_size)
    lines = []
    for g in (None, grid):
        one, two = tp_step_seconds(inputs, g), tp_step_seconds(twice, g)
        lines.append((2 * one - two, (two - one) / t))
    (a1, b1), (a2, b2) = lines
    if b2 < b1:
        return max(0.0, (a2 - a1) / (b1 - b2))
    return 0.0 if a2 < a1 else None


def choose_grid(inputs: PlanInputs, tp: Optional[int] = None) -> tuple[Optional[tuple[int, int]],
                                                                        str]:
    """The grid of ``tp`` (default ``inputs.tp``) the recommendation takes, or None for 1D, and
    why in one sentence: of the grids that run with these inputs, the one whose TP time per step
    (:func:`tp_step_seconds`: layers, embedding, lm_head, loss) is least, taken only when that
    time is below 1D's."""
    tp = inputs.tp if tp is None else tp
    rows = [compare_grid(_at(inputs, inputs.model_name, inputs.config), g) for g in grids(tp)]
    if not rows:
        return None, f"tp {tp} has no grid with both sides above 1: 1D."
    runnable = [x for x in rows if not x.refused]
    if not runnable:
        return None, f"1D at tp {tp}: no grid runs here ({rows[0].refused})."
    at = inputs.replace(tp=tp, grid=None, async_tp=False, save_sharded_inputs=False)
    one_d = tp_step_seconds(at, None)
    step, best = min(((tp_step_seconds(at, x.grid), x) for x in runnable), key=lambda sx: sx[0])
    r, c = best.grid
    where = (f"{r}x{c} moves {best.bytes_ratio:.2f}x 1D's bytes in {best.calls_2d} calls per"
             f" layer against {best.calls_1d} ({best.links}); TP time {step * 1e3:,.1f} ms against"
             f" {one_d * 1e3:,.1f} ms per step at {inputs.tokens:,} tokens per micro-batch")
    if step < one_d:
        return best.grid, f"2D {r}x{c} at tp {tp}: {where}."
    cross = step_crossover_tokens(at, best.grid)
    why = ("it never wins in time here: it moves no fewer bytes per token" if cross is None
           else f"2D wins only above {cross:,.0f} tokens per micro-batch")
    return None, f"1D at tp {tp}: {where}; {why}."
