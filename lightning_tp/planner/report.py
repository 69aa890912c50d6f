"""The planner's answer for one layout: :func:`analyze` builds a :class:`PlanReport` (plan rows,
ranks, memory, activations, collectives, estimate, waste, LoRA, verdict), and :func:`recommend`
ranks the other ``(tp, dp, activation checkpointing)`` layouts on the same devices as
:class:`Candidate` rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_tp.planner.communication import collectives
from lightning_tp.planner.crossover import choose_grid
from lightning_tp.planner.estimate import estimate
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import (
    ParamShard,
    adapters,
    check_shapes,
    meta_model,
    num_params,
    param_shards,
    plan_source,
    tp_choices,
)
from lightning_tp.planner.memory import (
    FROZEN_BASE,
    fits,
    layer_activation_bytes,
    lora_activation_bytes,
    memory,
)
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
    lora: dict[str, Any] = field(default_factory=dict)
    """Under LoRA (empty without): rank, targets, adapted projections, trainable parameters,
    the frozen base's and the adapters' bytes per rank, the adapters' activations per layer
    (:func:`lora_summary`)."""
    verdict: str = ""
    """One sentence: what runs where, its memory per rank against the device, whether it fits,
    and what fits instead when it does not."""
    two_d: str = ""
    """At tp > 1: whether a 2D grid of this tp takes less TP time per layer than 1D, and why
    (:func:`~lightning_tp.planner.crossover.choose_grid`)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _rank_groups(inputs: PlanInputs, shards: list[ParamShard], total: int) -> list[dict[str, Any]]:
    """Ranks grouped by their local parameter count; they differ only through uneven FSDP2 chunks
    (storage is padded, so memory does not differ)."""
    dp_eff = inputs.dp if inputs.fsdp else 1
    groups: dict[int, list[int]] = {}
    shape_counts = Counter((p.shape, p.tp_dim, p.trainable) for p in shards)
    for dp_rank in range(dp_eff):
        n = 0
        for (shape, dim, trainable), count in shape_counts.items():
            sh = ParamShard("", "", "", "", shape, dim, shape, 0, trainable)
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
    adapted = {x.module: (x.a, x.b) for x in adapters(inputs)}
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
        label = (p.style + ("" if p.trainable else " (frozen)")) if p else type(style).__name__
        rows.append({"module": path, "style": label,
                     "layouts": layouts,
                     "shape": list(p.shape) if p else None,
                     "tp_local": list(p.tp_shape) if p else None,
                     "rank0_local": (list(p.local_shape(inputs.tp, dp_eff, 0, 0, inputs.fsdp))
                                     if p else None)})
        for factor in adapted.get(path, ()):
            rows.append({"module": factor.module, "style": factor.style, "layouts": {},
                         "shape": list(factor.shape), "tp_local": list(factor.tp_shape),
                         "rank0_local": list(factor.local_shape(inputs.tp, dp_eff, 0, 0,
                                                                inputs.fsdp))})
    return rows


def analyze(inputs: PlanInputs, top: int = 5) -> PlanReport:
    """Everything the planner reports for one layout, plus the ranked alternatives."""
    check_shapes(inputs)
    shards = param_shards(inputs)
    mem = memory(inputs, shards)
    comms = collectives(inputs, shards)
    est = estimate(inputs, shards, comms)
    total = sum(mem.values())
    ranked = recommend(inputs, top=top) if top else []
    return PlanReport(
        inputs=_describe_inputs(inputs), plan=_plan_rows(inputs, shards),
        ranks=_rank_groups(inputs, shards, total), memory=mem,
        activations_per_layer=layer_activation_bytes(inputs),
        communication=[dataclasses.asdict(c) for c in comms], estimate=dataclasses.asdict(est),
        recommendation=[dataclasses.asdict(c) for c in ranked],
        waste=dataclasses.asdict(waste(inputs, comms, est.step_s, total)),
        least_waste=least_waste(inputs) if top else {},
        lora=lora_summary(inputs, mem, comms), verdict=verdict(inputs, mem, est, ranked),
        two_d=choose_grid(inputs)[1] if inputs.tp > 1 else "",
    )


def lora_summary(inputs: PlanInputs, mem: dict[str, float],
                 comms: list[Any]) -> dict[str, Any]:
    """The LoRA figures of one layout (empty without LoRA): what trains, what it costs per rank
    and what the adapters add to each layer's activations and to the TP traffic."""
    lora = inputs.lora
    if lora is None:
        return {}
    found = adapters(inputs)
    trainable = sum(math.prod(x.a.shape) + math.prod(x.b.shape) for x in found)
    layer = [x.module.rpartition(".")[2] for x in found if x.unit == found[0].unit]
    reduces = [c for c in comms if c.where.startswith("LoRA ")]
    return {
        "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
        "target_modules": list(lora.target_modules), "adapted_per_layer": layer,
        "adapted_projections": len(found), "trainable_parameters": trainable,
        "trainable_fraction": trainable / (num_params(inputs) + trainable),
        "frozen_base_bytes": mem[FROZEN_BASE],
        "adapter_parameter_bytes": mem["adapter parameters"],
        "adapter_gradient_bytes": mem["adapter gradients"],
        "adapter_optimizer_bytes": mem["adapter optimizer (AdamW)"],
        "adapter_activation_bytes_per_layer": sum(lora_activation_bytes(inputs).values()),
        "tp_all_reduces_per_step": sum(c.calls for c in reduces),
        "tp_all_reduce_bytes_per_rank": sum(c.bytes_per_rank for c in reduces),
    }


def _where(inputs: PlanInputs) -> str:
    """``"tp 8 x dp 1 on one node of 8 x h100"``."""
    per, world, acc = inputs.devices_per_node, inputs.world, inputs.accelerator.name
    nodes = -(-world // per)
    place = (f"one node of {per} x {acc}" if world == per
             else f"{world} of one node's {per} {acc}" if world < per
             else f"{nodes} nodes of {per} x {acc}")
    grid = f" (2D grid {inputs.grid[0]}x{inputs.grid[1]})" if inputs.grid else ""
    return f"tp {inputs.tp}{grid} x dp {inputs.dp} on {place}"


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
    save_sharded_inputs: bool = False
    """With ``activation_checkpointing="none"`` under SP: the gathered block inputs kept as their
    sequence shard and all-gathered again in backward."""
    grid: Optional[tuple[int, int]] = None
    """2D tensor parallelism over a ``(r, c)`` grid of the tp devices; None: 1D."""

    @property
    def setting(self) -> str:
        """The activation setting in words: ``none``, ``none + sharded inputs``, ..."""
        return self.activation_checkpointing + (" + sharded inputs" if self.save_sharded_inputs
                                                else "")

    @property
    def layout(self) -> str:
        """``tp 8`` (1D) or ``tp 8 as 4x2`` (2D)."""
        return f"tp {self.tp}" + (f" as {self.grid[0]}x{self.grid[1]}" if self.grid else "")


def settings(inputs: PlanInputs, tp: Optional[int] = None) -> list[tuple[str, bool]]:
    """``(activation_checkpointing, save_sharded_inputs)`` from the least recomputation to the
    most: none, none with the sequence shards kept (under SP at tp > 1, eager: where the strategy
    takes it), selective, full; under a 2D grid none and full (what it takes)."""
    tp = inputs.tp if tp is None else tp
    if inputs.grid is not None:
        return [("none", False), ("full", False)]
    out = [("none", False)]
    if inputs.sequence_parallel and tp > 1 and not inputs.compile:
        out.append(("none", True))
    return out + [(ac, False) for ac in AC_BY_RECOMPUTE if ac != "none"]


def _evaluate(cand: PlanInputs) -> Candidate:
    shards = param_shards(cand)
    total = sum(memory(cand, shards).values())
    est = estimate(cand, shards, collectives(cand, shards))
    return Candidate(cand.tp, cand.dp, cand.activation_checkpointing, total, fits(cand, total),
                     est.step_s, est.tokens_per_s_per_device, est.mfu,
                     save_sharded_inputs=cand.save_sharded_inputs, grid=cand.grid)


def recommend(inputs: PlanInputs, top: int = 5) -> list[Candidate]:
    """Every (tp, dp = world / tp, activation checkpointing) with tp dividing the node and the
    model's sharded dimensions, the micro-batch per replica kept; those that fit first, fastest
    first. Replicated projections, their all-reduces and the busiest rank's heads and vocabulary
    rows are in each candidate's memory and step time.

    A tp's 2D grid is a candidate too (activation checkpointing none and full, the settings 2D
    takes) where :func:`~lightning_tp.planner.crossover.choose_grid` takes it: the grid that runs
    with these inputs and whose TP time per layer is below 1D's. Equal throughput goes to 1D."""
    base = inputs.replace(grid=None)
    out = [_evaluate(base.replace(tp=tp, dp=dp, activation_checkpointing=ac,
                                  save_sharded_inputs=sharded,
                                  async_tp=inputs.async_tp and tp > 1))
           for tp, dp in tp_choices(base) for ac, sharded in settings(base, tp)]
    for tp, dp in tp_choices(base):
        for ac in ("none", "full") if tp > 1 else ():
            mode = base.replace(activation_checkpointing=ac, save_sharded_inputs=False)
            grid = choose_grid(mode, tp)[0]
            if grid is not None:
                out.append(_evaluate(mode.replace(tp=tp, dp=dp, grid=grid)))
    # Ties (communication-bound layouts where recomputation hides under FSDP2 traffic) go to less
    # recomputation, the regathered inputs before selective's.
    out.sort(key=lambda c: (not c.fits, -round(c.tokens_per_s_per_device, 3),
                            RECOMPUTE[c.activation_checkpointing].cost, c.save_sharded_inputs,
                            c.grid is not None))
    return out[:top]


def _setting_words(c: Candidate) -> str:
    words = f"activation checkpointing {c.activation_checkpointing}"
    if c.grid is not None:
        words = f"as a 2D grid strategy.tensor_parallel_size=[{c.grid[0]},{c.grid[1]}], {words}"
    return words + (" and strategy.save_sharded_inputs=true" if c.save_sharded_inputs else "")


def _option(c: Candidate) -> str:
    return f"{c.memory / 2**30:,.1f} GiB, {c.tokens_per_s_per_device:,.0f} tokens/s per device"


def verdict(inputs: PlanInputs, mem: dict[str, float], est: Any,
            ranked: list[Candidate]) -> str:
    """One sentence on this layout (``mem``: its memory per rank by part): what trains on which
    devices, its memory per rank against what the device leaves after the headroom, and, when it
    does not fit, what does: the same (tp, dp) with more activation checkpointing, under LoRA
    without dropout, and the fastest fitting layout of the recommendation ``ranked``."""
    lora, name, total = inputs.lora, inputs.model_name, sum(mem.values())
    if lora is None:
        what = f"Training every weight of {name}"
    else:
        per_layer = len(adapters(inputs)) // inputs.config.num_hidden_layers
        what = (f"LoRA (r={lora.rank}, {per_layer} projections per layer, dropout"
                f" {lora.dropout:g}) on {name}")
    usable = (1 - inputs.memory_headroom) * inputs.accelerator.memory_bytes
    mode = inputs.activation_checkpointing
    sharded = " and sharded inputs" if inputs.save_sharded_inputs else ""
    head = (f"{what} at {_where(inputs)}, activation checkpointing {mode}{sharded}:"
            f" {total / 2**30:,.1f} GiB per rank of {usable / 2**30:,.1f} GiB usable")
    if fits(inputs, total):
        return (f"{head}: fits, {est.tokens_per_s_per_device:,.0f} tokens/s per device"
                f" (estimate).")
    options = []
    order = settings(inputs)
    current = (mode, inputs.save_sharded_inputs)
    more = order[order.index(current) + 1:] if current in order else []
    here = next((c for c in map(_evaluate, (inputs.replace(activation_checkpointing=ac,
                                                           save_sharded_inputs=sharded)
                                            for ac, sharded in more)) if c.fits), None)
    if here is not None:
        options.append(_setting_words(here) + f" ({_option(here)})")
    if lora is not None and lora.dropout:
        plain = _evaluate(inputs.replace(lora=dataclasses.replace(lora, dropout=0.0)))
        if plain.fits:
            options.append(f"peft.dropout=0, which keeps no dropout mask per adapter"
                           f" ({_option(plain)})")
    out = f"{head}: does not fit."
    if options:
        out += (f" At tp {inputs.tp} x dp {inputs.dp} it fits with " + " or with ".join(options)
                + ".")
    fitting = [c for c in ranked if c.fits]
    if fitting and (fitting[0].tp, fitting[0].dp, fitting[0].grid) != (inputs.tp, inputs.dp,
                                                                         inputs.grid):
        c = fitting[0]
        out += (f" The fastest layout that fits on these devices: tp {c.tp} x dp {c.dp},"
                f" {_setting_words(c)} ({_option(c)}).")
    if options or fitting:
        return out
    if lora is None:
        return out + (" Nothing fits on these devices: add devices (strategy.data_parallel_size),"
                      " shorten data.seq_len or data.batch_size, or pick an accelerator with more"
                      " memory.")
    frozen = mem[FROZEN_BASE]
    if frozen > usable:
        return out + (f" The frozen base alone is {frozen / 2**30:,.1f} GiB per rank at tp"
                      f" {inputs.tp}: TP shards it, data parallelism does not (FSDP2 leaves it"
                      " out). Fix: an accelerator with more memory.")
    return out + (" Nothing fits on these devices: shorten data.seq_len or data.batch_size, or"
                  " pick an accelerator with more memory (more data-parallel devices do not"
                  " divide the frozen base).")
