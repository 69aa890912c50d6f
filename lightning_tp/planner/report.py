"""The planner's answer for one layout: :func:`analyze` builds a :class:`PlanReport` (plan rows,
ranks, memory, activations, collectives, estimate, waste), and :func:`recommend` ranks the other
``(tp, dp, activation checkpointing)`` layouts on the same devices as :class:`Candidate` rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lightning_tp.planner.communication import collectives
from lightning_tp.planner.estimate import estimate
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import (
    ParamShard,
    check_shapes,
    meta_model,
    num_params,
    param_shards,
    plan_source,
    tp_choices,
)
from lightning_tp.planner.memory import fits, layer_activation_bytes, memory
from lightning_tp.planner.modes import AC_BY_RECOMPUTE, RECOMPUTE
from lightning_tp.planner.waste import least_waste, waste

__all__ = ["Candidate", "PlanReport", "analyze", "recommend"]


@dataclass
class PlanReport:
    inputs: dict[str, Any]
    plan: list[dict[str, Any]]
    """Applied plan rows (embeddings, block 0, final norm, lm_head): module, style, shapes."""
    ranks: list[dict[str, Any]]
    """Ranks grouped by identical per-rank figures."""
    memory: dict[str, int]
    activations_per_layer: dict[str, int]
    communication: list[dict[str, Any]]
    estimate: dict[str, Any]
    recommendation: list[dict[str, Any]] = field(default_factory=list)
    waste: dict[str, Any] = field(default_factory=dict)
    """Head layout and waste at this tp against an even split (:class:`~.waste.Waste`)."""
    least_waste: dict[str, Any] = field(default_factory=dict)
    """The tp on these devices that wastes least: ``{"tp", "reason", "by_tp"}`` (empty when
    ``top`` is 0: no search)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _rank_groups(inputs: PlanInputs, shards: list[ParamShard], total: int) -> list[dict[str, Any]]:
    """Ranks grouped by their local parameter count; they differ only through uneven FSDP2 chunks
    (storage is padded, so memory does not differ)."""
    dp_eff = inputs.dp if inputs.fsdp else 1
    groups: dict[int, list[int]] = {}
    shape_counts = Counter((p.shape, p.tp_dim) for p in shards)
    for dp_rank in range(dp_eff):
        n = 0
        for (shape, dim), count in shape_counts.items():
            sh = ParamShard("", "", "", "", shape, dim, shape, 0)
            n += count * math.prod(sh.local_shape(inputs.tp, dp_eff, 0, dp_rank, inputs.fsdp))
        groups.setdefault(n, []).append(dp_rank)
    ranks = []
    for n, dp_ranks in groups.items():
        members = [d * inputs.tp + t for d in dp_ranks for t in range(inputs.tp)]
        ranks.append({"ranks": _ranges(members), "local_parameters": n,
                      "stored_parameters_padded": sum(p.padded_shard for p in shards),
                      "memory_total": total, "fits": fits(inputs, total)})
    return ranks


def _plan_rows(inputs: PlanInputs, shards: list[ParamShard]) -> list[dict[str, Any]]:
    """The applied plan of the embeddings, decoder block 0, the final norm and lm_head."""
    shown = {"model.embed_tokens", "model.norm", "lm_head"}
    dp_eff = inputs.dp if inputs.fsdp else 1
    model, resolved = meta_model(inputs)
    by_module: dict[str, ParamShard] = {}
    for p in shards:  # a module's first parameter (its weight, not its bias)
        by_module.setdefault(p.module, p)
    rows = []
    order = {name: n for n, (name, _) in enumerate(model.named_modules())}
    for path in sorted(resolved.styles, key=order.__getitem__):
        if not (path in shown or path == "model.layers.0" or path.startswith("model.layers.0.")):
            continue
        style, p = resolved.styles[path], by_module.get(path)
        layouts = {k.replace("_layouts", ""): _short(v) for k, v in vars(style).items()
                   if "layout" in k and v}
        rows.append({"module": path, "style": p.style if p else type(style).__name__,
                     "layouts": layouts,
                     "shape": list(p.shape) if p else None,
                     "tp_local": list(p.tp_shape) if p else None,
                     "rank0_local": (list(p.local_shape(inputs.tp, dp_eff, 0, 0, inputs.fsdp))
                                     if p else None)})
    return rows


def analyze(inputs: PlanInputs, top: int = 5) -> PlanReport:
    """Everything the planner reports for one layout, plus the ranked alternatives."""
    check_shapes(inputs)
    shards = param_shards(inputs)
    mem = memory(inputs, shards)
    comms = collectives(inputs, shards)
    est = estimate(inputs, shards, comms)
    total = sum(mem.values())
    return PlanReport(
        inputs=_describe_inputs(inputs), plan=_plan_rows(inputs, shards),
        ranks=_rank_groups(inputs, shards, total), memory=mem,
        activations_per_layer=layer_activation_bytes(inputs),
        communication=[dataclasses.asdict(c) for c in comms], estimate=dataclasses.asdict(est),
        recommendation=([dataclasses.asdict(c) for c in recommend(inputs, top=top)]
                        if top else []),
        waste=dataclasses.asdict(waste(inputs, comms, est.step_s, total)),
        least_waste=least_waste(inputs) if top else {},
    )


def _short(layout: Any) -> str:
    """``(Shard(dim=1),)`` → ``Shard(1)``; dicts of keyword layouts likewise."""
    if isinstance(layout, dict):
        return ",".join(f"{k}:{_short(v)}" for k, v in layout.items())
    if isinstance(layout, (tuple, list)):
        return ",".join(_short(v) for v in layout)
    return str(layout).replace("dim=", "")


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    ranks, parts, start = sorted(ranks), [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def _describe_inputs(inputs: PlanInputs) -> dict[str, Any]:
    objects = ("config", "accelerator", "intra_link", "inter_link")
    d = {k: v for k, v in dataclasses.asdict(inputs).items() if k not in objects}
    d.update(accelerator=inputs.accelerator.name, intra_link=inputs.intra_link.name,
             inter_link=inputs.inter_link.name, world=inputs.world,
             num_params=num_params(inputs), device_memory=inputs.accelerator.memory_bytes,
             plan_source=plan_source(inputs))
    return d


@dataclass(frozen=True)
class Candidate:
    tp: int
    dp: int
    activation_checkpointing: str
    memory: int
    fits: bool
    step_s: float
    tokens_per_s_per_device: float
    mfu: float


def recommend(inputs: PlanInputs, top: int = 5) -> list[Candidate]:
    """Every (tp, dp = world / tp, activation checkpointing) with tp dividing the node and the
    model's sharded dimensions, the micro-batch per replica kept; those that fit first, fastest
    first. Replicated projections, their all-reduces and the busiest rank's heads and vocabulary
    rows are in each candidate's memory and step time."""
    out = []
    for tp, dp in tp_choices(inputs):
        for ac in AC_BY_RECOMPUTE:
            cand = inputs.replace(tp=tp, dp=dp, activation_checkpointing=ac,
                                  async_tp=inputs.async_tp and tp > 1)
            shards = param_shards(cand)
            total = sum(memory(cand, shards).values())
            est = estimate(cand, shards, collectives(cand, shards))
            out.append(Candidate(tp, dp, ac, total, fits(cand, total), est.step_s,
                                 est.tokens_per_s_per_device, est.mfu))
    # Ties (communication-bound layouts where recomputation hides under FSDP2 traffic) go to less
    # recomputation.
    out.sort(key=lambda c: (not c.fits, -round(c.tokens_per_s_per_device, 3),
                            RECOMPUTE[c.activation_checkpointing].cost))
    return out[:top]
