"""What a tp that does not split the model evenly costs, and the tp that wastes least.

Owns :class:`Waste` (one tp: which projections the plan replicates and why, the bytes per rank
beyond an even split, the extra weight-gradient all-reduces, the busiest rank's extra heads and
vocabulary rows and the compute they take), :func:`waste` and :func:`least_waste` (the tp on the
same devices with the smallest waste). Every figure is a difference against the *even split*: each
rank holding ``1/t`` of every sharded tensor, ``nh/t`` query heads, ``nkv/t`` KV heads and ``V/t``
vocabulary rows (fractional where tp does not divide them). Formulas in docs/planner.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lightning_tp.parallel.heads import head_layout
from lightning_tp.planner.communication import Collective, collectives, replicated_gradients
from lightning_tp.planner.estimate import compute_seconds, estimate, rank_flops
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import busiest_rank, param_shards, tp_choices
from lightning_tp.planner.memory import activations, fits, memory
from lightning_tp.planner.modes import BYTES_PER_ELEMENT

__all__ = ["Waste", "least_waste", "replicated_projections", "summary", "waste"]


def replicated_projections(inputs: PlanInputs) -> list[dict[str, str]]:
    """``{"projections", "reason"}`` for each pair the plan keeps whole at this tp."""
    cfg, t = inputs.config, inputs.tp
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    heads, rank = head_layout(nh, nkv, t), busiest_rank(cfg, t)
    out = []
    if heads.q_replicated:
        out.append({"projections": "q_proj/o_proj",
                    "reason": f"{nh} query heads at tp {t}: tp does not divide them,"
                              f" {rank.q_heads} or {rank.q_heads - 1} per rank"})
        out.append({"projections": "k_proj/v_proj",
                    "reason": f"uneven query heads: one copy of the KV head per local query"
                              f" head, {rank.kv_heads} on the busiest rank ({nkv} KV heads)"})
    elif heads.kv_replicated:
        why = "fewer KV heads than ranks" if nkv < t else "tp does not divide them"
        out.append({"projections": "k_proj/v_proj",
                    "reason": f"{nkv} KV heads at tp {t}: {why}, {rank.kv_heads} computed per"
                              f" rank"})
    return out


@dataclass(frozen=True)
class Waste:
    """The cost of one tp against an even split, on the busiest rank, per optimizer step."""

    tp: int
    replicated: list[dict[str, str]]
    """Projections kept whole on every rank, and why."""
    memory_bytes: dict[str, float]
    """Bytes per rank beyond the even split, by cause."""
    all_reduces_per_layer: int
    """Weight-gradient all-reduces of the replicated projections, per decoder layer (bwd)."""
    all_reduces_per_step: int
    all_reduce_bytes_per_rank: float
    all_reduce_s: float
    q_heads: int
    """Query heads on the busiest rank."""
    q_heads_even: float
    head_imbalance: float
    """``q_heads / (nh / t) − 1``."""
    kv_heads: int
    """KV heads (copies) the busiest rank computes."""
    kv_heads_even: float
    vocab_rows: int
    """Embedding / lm_head rows on the busiest rank, ``ceil(V / t)``."""
    vocab_rows_even: float
    vocab_imbalance: float
    compute_extra_s: float
    """Compute of the busiest rank beyond the even split (extra heads, KV copies, vocab rows)."""
    compute_imbalance: float
    """``compute / even compute − 1``."""
    step_extra_s: float
    """All-reduces + extra compute + the optimizer step over the extra parameter bytes."""
    memory_fraction: float
    """Extra bytes over the rank's peak memory."""
    time_fraction: float
    """``step_extra_s`` over the step time."""
    score: float = field(default=0.0)
    """``memory_fraction + time_fraction``: what :func:`least_waste` minimises."""


def _extra_elements(inputs: PlanInputs) -> tuple[float, float]:
    """(replicated projections, vocabulary imbalance): parameter elements per rank beyond the
    even split, after the FSDP2 split over dp (none for a frozen LoRA base, outside FSDP2)."""
    cfg, t = inputs.config, inputs.tp
    dp = inputs.dp if inputs.fsdp and inputs.lora is None else 1
    per_head = cfg.resolved_head_dim * cfg.hidden_size
    heads = head_layout(cfg.num_attention_heads, cfg.num_key_value_heads, t)
    # a replicated weight keeps all of it on every rank instead of 1/t
    whole = (2 * cfg.num_key_value_heads * per_head * heads.kv_replicated
             + 2 * cfg.num_attention_heads * per_head * heads.q_replicated)
    replicated = cfg.num_hidden_layers * whole * (1 - 1 / t) / dp
    tables = 1 if cfg.tie_word_embeddings else 2  # embed_tokens (and an untied lm_head)
    rows = busiest_rank(cfg, t).vocab_rows - cfg.vocab_size / t
    return replicated, tables * rows * cfg.hidden_size / dp


def waste(inputs: PlanInputs, comms: list[Collective] | None = None,
          step_s: float | None = None, memory_total: float | None = None) -> Waste:
    """The waste of ``inputs``' tp (``comms``, ``step_s`` and ``memory_total`` computed here
    when not given)."""
    cfg, t = inputs.config, inputs.tp
    if comms is None or step_s is None or memory_total is None:
        shards = param_shards(inputs)
        comms = collectives(inputs, shards)
        step_s = estimate(inputs, shards, comms).step_s
        memory_total = sum(memory(inputs, shards).values())
    stored, compute, grad, optim = BYTES_PER_ELEMENT[inputs.precision]
    per_element = stored + grad + optim  # parameter, gradient, AdamW moments
    what = "params+grads+AdamW"
    if inputs.lora is not None:  # the frozen base: its 16-bit copy only (the adapters' is small)
        per_element, what = compute, "frozen base"
    replicated, vocab = _extra_elements(inputs)
    extra_act = sum(activations(inputs).values()) - sum(activations(inputs, even=True).values())
    mem = {f"replicated projections ({what})": per_element * replicated,
           f"vocabulary imbalance ({what})": per_element * vocab,
           "activations (heads, KV copies, vocab rows)": extra_act}
    rows = [c for c in comms if c.group == "tp" and c.where.startswith("replicated ")]
    per_layer = sum(calls for _, calls, _ in replicated_gradients(inputs))
    reduce_s = sum(c.seconds for c in rows)
    compute = compute_seconds(inputs, rank_flops(inputs))
    even = compute_seconds(inputs, rank_flops(inputs, even=True))
    optimizer = (0.0 if inputs.lora is not None  # a frozen weight never steps
                 else 7 * stored * (replicated + vocab) / inputs.accelerator.hbm_bandwidth)
    step_extra = reduce_s + (compute - even) + optimizer
    rank = busiest_rank(cfg, t)
    nh, nkv, v = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    memory_fraction = sum(mem.values()) / memory_total
    time_fraction = step_extra / step_s
    return Waste(
        tp=t, replicated=replicated_projections(inputs), memory_bytes=mem,
        all_reduces_per_layer=per_layer, all_reduces_per_step=sum(c.calls for c in rows),
        all_reduce_bytes_per_rank=sum(c.bytes_per_rank for c in rows), all_reduce_s=reduce_s,
        q_heads=rank.q_heads, q_heads_even=nh / t, head_imbalance=rank.q_heads * t / nh - 1,
        kv_heads=rank.kv_heads, kv_heads_even=nkv / t, vocab_rows=rank.vocab_rows,
        vocab_rows_even=v / t, vocab_imbalance=rank.vocab_rows * t / v - 1,
        compute_extra_s=compute - even, compute_imbalance=compute / even - 1,
        step_extra_s=step_extra, memory_fraction=memory_fraction, time_fraction=time_fraction,
        score=memory_fraction + time_fraction)


def summary(w: Waste | dict[str, Any]) -> str:
    """One line: what ``w``'s tp replicates and what that costs, or that nothing is wasted."""
    w = dataclasses.asdict(w) if isinstance(w, Waste) else w
    if w["tp"] == 1:
        return "tp 1: nothing split, nothing wasted"
    if w["score"] == 0:
        return (f"tp {w['tp']}: no waste (query heads, KV heads and vocabulary split evenly,"
                f" nothing replicated)")
    parts = []
    if w["replicated"]:
        parts.append("replicates " + ", ".join(r["projections"] for r in w["replicated"])
                     + f" ({w['replicated'][0]['reason']}), {w['all_reduces_per_step']} extra"
                     f" all-reduces per step")
    if w["vocab_rows"] != w["vocab_rows_even"]:
        parts.append(f"{w['vocab_rows']} vocabulary rows on the busiest rank against"
                     f" {w['vocab_rows_even']:g}")
    extra = sum(w["memory_bytes"].values())
    return (f"tp {w['tp']}: " + "; ".join(parts) + f": +{extra / 2**20:,.1f} MiB per rank,"
            f" +{w['step_extra_s'] * 1e3:,.2f} ms per step ({w['score']:.2%} waste)")


TIE_DIGITS = 4
"""Scores equal to this many decimals (0.01 %, the precision the report prints) are a tie."""


def least_waste(inputs: PlanInputs) -> dict[str, Any]:
    """The tp on these devices (as the recommendation searches them, activation checkpointing
    kept) whose layout fits and wastes least: the smallest ``score`` to 0.01 %, ties to the larger
    tp (more tensor parallelism for the same waste). Returns ``{"tp", "reason", "by_tp"}``."""
    rows = []
    for tp, dp in tp_choices(inputs):
        cand = inputs.replace(tp=tp, dp=dp, async_tp=inputs.async_tp and tp > 1, grid=None)
        shards = param_shards(cand)
        comms = collectives(cand, shards)
        total = sum(memory(cand, shards).values())
        w = waste(cand, comms, estimate(cand, shards, comms).step_s, total)
        rows.append((fits(cand, total), w))
    if not rows:
        return {"tp": None, "reason": "no tp passes the shape rules on these devices", "by_tp": []}
    pool = [w for ok, w in rows if ok] or [w for _, w in rows]
    best = min(pool, key=lambda w: (round(w.score, TIE_DIGITS), -w.tp))
    reason = summary(best)
    larger = [w for w in pool if w.tp > best.tp]  # each wastes more, or it would have been picked
    if larger:  # what the next step up would cost
        reason += "; " + summary(larger[0]).replace(f"tp {larger[0].tp}:", f"tp {larger[0].tp}"
                                                    " would waste more:", 1)
    if not any(ok for ok, _ in rows):
        reason += " (no tp fits in memory; all compared)"
    return {"tp": best.tp, "reason": reason,
            "by_tp": [dict(dataclasses.asdict(w), fits=ok) for ok, w in rows]}
