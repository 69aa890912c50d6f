"""Collectives one rank runs per optimizer step, and their time on the link each group uses.

Owns :class:`Collective`, :func:`collectives` (tensor-parallel traffic per layer and outside the
layers, FSDP2's all-gathers and reduce-scatters, and under LoRA the all-reduces of the adapters'
replicated factors), the ring cost of one collective (:func:`ring_bytes`) and which link a group
runs over (:func:`group_link`; a 2D grid's row and column groups: :func:`grid_link`). Under a 2D
grid (``inputs.grid``) the decoder layers' TP rows are :func:`grid_layer_collectives`'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lightning_tp.hardware import Link
from lightning_tp.parallel.heads import head_layout
from lightning_tp.planner.grid import LayerTerm, layer_terms
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import (
    ROOT_UNIT,
    ParamShard,
    adapters,
    busiest_rank,
    param_shards,
    units,
)
from lightning_tp.planner.memory import sharded_saves
from lightning_tp.planner.modes import BYTES_PER_ELEMENT, RECOMPUTE

__all__ = ["Collective", "collectives", "grid_layer_collectives", "grid_link", "group_link",
           "replicated_gradients", "ring_bytes"]


@dataclass(frozen=True)
class Collective:
    """Calls of one collective type per optimizer step, on one rank."""

    group: str
    """'tp' or 'dp'."""
    kind: str
    """all_gather | reduce_scatter | all_reduce."""
    where: str
    calls: int
    tensor_bytes: int
    """Bytes of the whole (gathered / reduced) tensor per call (the mean over FSDP2 units)."""
    link: str
    bytes_per_rank: float
    """Bytes each rank sends per step over a ring: (n−1)/n·S per all-gather or reduce-scatter,
    twice that per all-reduce."""
    seconds: float


def ring_bytes(kind: str, n: int, size: float) -> float:
    """Bytes each of ``n`` ranks sends for one ring collective over a ``size``-byte tensor."""
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * size


def group_link(inputs: PlanInputs, group: str) -> Link:
    """The link a ``'tp'`` or ``'dp'`` group runs over: inside a node while it fits in one."""
    span = inputs.tp if group == "tp" else inputs.world
    return inputs.intra_link if span <= inputs.devices_per_node else inputs.inter_link


def grid_link(inputs: PlanInputs, axis: str, grid: tuple[int, int]) -> Link:
    """The link of a 2D grid's ``'R'`` group (``r`` devices ``c`` apart: inside a node while the
    whole TP group is), ``'C'`` group (``c`` consecutive devices: inside a node while ``c``
    divides the node size) or ``'RC'`` (the whole TP group), the TP group starting on a node
    boundary as the strategy's mesh does."""
    r, c = grid
    per = inputs.devices_per_node
    if axis == "C":
        inside = c <= per and per % c == 0
    else:
        inside = (axis == "R" and r == 1) or r * c <= per
    return inputs.intra_link if inside else inputs.inter_link


def _term_collective(inputs: PlanInputs, grid: tuple[int, int], term: LayerTerm, times: int,
                     where: str) -> Collective:
    """``term`` run ``times`` over (layers x micro-batches) as a :class:`Collective` row: bytes in
    the activation dtype (fp32 for norm statistics), time ``bytes / (bandwidth·efficiency) +
    calls·latency`` on the axis' link."""
    size = 4 if term.fp32 else BYTES_PER_ELEMENT[inputs.precision].compute
    link = grid_link(inputs, term.axis, grid)
    sent = times * size * term.sent(*grid)
    calls = times * term.calls
    return Collective("tp", term.kind, f"{where}{term.name} over {term.axis}", calls,
                      int(size * term.elements), link.name, sent,
                      sent / link.effective_bandwidth + calls * link.latency)


def grid_layer_collectives(inputs: PlanInputs, grid: Optional[tuple[int, int]] = None,
                           tokens: Optional[int] = None) -> list[Collective]:
    """One decoder layer's TP collectives, forward and backward, for one micro-batch of
    ``tokens`` (default ``inputs.tokens``) under ``grid`` (default ``inputs.grid``; ``(tp, 1)``
    is the 1D SP layer): :func:`~lightning_tp.planner.grid.layer_terms` on the model's widths,
    recomputed under full checkpointing, timed on :func:`grid_link`."""
    grid = grid or inputs.grid or (inputs.tp, 1)
    return [_term_collective(inputs, grid, x, 1, "")
            for x in _layer_terms(inputs, grid, inputs.tokens if tokens is None else tokens)]


def _layer_terms(inputs: PlanInputs, grid: tuple[int, int], tokens: int) -> list[LayerTerm]:
    cfg = inputs.config
    d = cfg.resolved_head_dim
    return layer_terms(tokens, cfg.hidden_size, cfg.num_attention_heads * d,
                       cfg.num_key_value_heads * d, cfg.intermediate_size, *grid,
                       recompute=RECOMPUTE[inputs.activation_checkpointing].forward)


def _grid_rows(inputs: PlanInputs) -> list[Collective]:
    """TP collectives per step under a 2D grid: every decoder layer's
    (:func:`grid_layer_collectives`), and outside the layers the embedding output (partial over
    every device, all-reduced over the flattened mesh and sliced to ``[b, s/r, h/c]``, whose
    backward all-gathers it; as 1D's) and lm_head's input (all-gathered over R along the sequence,
    then over C along h; backward the reduce-scatters)."""
    r, c = grid = inputs.grid
    layers, m, e, h = (inputs.config.num_hidden_layers, inputs.accumulate, inputs.tokens,
                       inputs.config.hidden_size)
    out = [_term_collective(inputs, grid, x, layers * m, "decoder layers 2D: ")
           for x in _layer_terms(inputs, grid, e)]
    outside = [
        LayerTerm("embedding output (fwd)", "all_reduce", "RC", 1, e * h),
        LayerTerm("sequence split before layer 0 (bwd)", "all_gather", "RC", 1, e * h),
        LayerTerm("lm_head input (fwd)", "all_gather", "R", 1, e * h / c),
        LayerTerm("lm_head input (fwd)", "all_gather", "C", 1, e * h),
        LayerTerm("lm_head input gradient (bwd)", "reduce_scatter", "C", 1, e * h),
        LayerTerm("lm_head input gradient (bwd)", "reduce_scatter", "R", 1, e * h / c),
    ]
    return out + [_term_collective(inputs, grid, x, m, "") for x in outside
                  if x.group_size(r, c) > 1]


def replicated_gradients(inputs: PlanInputs) -> list[tuple[str, int, int]]:
    """``(projections, all-reduces per layer, bytes of one)`` for the projections the plan keeps
    whole because tp does not split their heads (:mod:`lightning_tp.parallel.heads`): each
    rank's weight gradient is a partial sum over the TP ranks, all-reduced once per projection
    per layer in backward.

    The gradient has the dtype of the weight the layer multiplies by: FSDP2's ``param_dtype``
    (the compute dtype, bf16 under ``bf16-mixed``) with FSDP, else the stored parameter's.

    Under LoRA the frozen weight has no gradient; the adapter factor that follows a replicated
    base (``lora_B`` of q/k/v, ``lora_A`` of o_proj) is selected the same way, and its gradient
    is all-reduced instead (``out·r`` or ``r·in`` elements).
    """
    cfg = inputs.config
    heads = head_layout(cfg.num_attention_heads, cfg.num_key_value_heads, inputs.tp)
    element = BYTES_PER_ELEMENT[inputs.precision]
    size = element.compute if inputs.fsdp else element.stored
    if inputs.lora is not None:
        found = adapters(inputs)
        groups: dict[tuple[str, int], list[str]] = {}
        for x in found:
            factor = x.selected_factor
            if x.unit == found[0].unit and factor is not None:
                name = f"LoRA {factor.name.rpartition('.lora_')[2][0]}"
                groups.setdefault((name, math.prod(factor.shape) * size), []).append(
                    x.module.rpartition(".")[2])
        return [(f"{'/'.join(names)} {name}", len(names), nbytes)
                for (name, nbytes), names in groups.items()]
    per_head = cfg.resolved_head_dim * cfg.hidden_size * size
    out = []
    if heads.kv_replicated:
        out.append(("k_proj/v_proj", 2, cfg.num_key_value_heads * per_head))
    if heads.q_replicated:
        out.append(("q_proj/o_proj", 2, cfg.num_attention_heads * per_head))
    return out


_LAYERS = "decoder layers: 2 fwd + 2 bwd (+ recompute or regather) per layer"

# (kind, where, calls per micro-batch, bytes of one call's whole tensor)
_Row = tuple[str, str, int, int]


def _tp_rows(inputs: PlanInputs) -> list[_Row]:
    """Tensor-parallel collectives of one micro-batch."""
    cfg, layers = inputs.config, inputs.config.num_hidden_layers
    a = BYTES_PER_ELEMENT[inputs.precision].compute
    act = inputs.tokens * cfg.hidden_size * a  # one whole (b, s, h) activation
    again = RECOMPUTE[inputs.activation_checkpointing]
    # save_sharded_inputs: the two block inputs all-gathered again in backward
    regather = 2 if sharded_saves(inputs) else 0
    if inputs.grid is not None:  # the layers, embedding and lm_head rows: _grid_rows
        rows = []
    elif inputs.sequence_parallel:
        # Forward: all-gather before attention and MLP, reduce-scatter after o_proj and down_proj;
        # backward the reverse; recomputation repeats some forward collectives.
        rows = [("all_gather", _LAYERS, (4 + again.gathers + regather) * layers, act),
                ("reduce_scatter", _LAYERS, (4 + again.reductions) * layers, act),
                ("all_reduce", "embedding output (fwd)", 1, act),
                ("all_gather", "sequence split before layer 0 (bwd)", 1, act),
                ("all_gather", "lm_head input (fwd)", 1, act),
                ("reduce_scatter", "lm_head input gradient (bwd)", 1, act)]
    else:
        rows = [("all_reduce", _LAYERS, (4 + again.reductions) * layers, act),
                ("all_reduce", "embedding output (fwd)", 1, act),
                ("all_reduce", "lm_head input gradient (bwd)", 1, act)]
    rows += [("all_reduce", f"replicated {names} weight gradients (bwd)", calls * layers, size)
             for names, calls, size in replicated_gradients(inputs)]
    if inputs.loss_parallel:
        rows.append(("all_reduce", "vocab-parallel cross entropy: max, sum-exp, target", 3,
                     4 * inputs.tokens))
    else:
        rows.append(("all_gather", "logits gathered for the loss (fwd)", 1,
                     a * inputs.tokens * cfg.vocab_size))
    return rows


def _lora_rows(inputs: PlanInputs) -> list[tuple[str, str, str, int, int]]:
    """Under LoRA at tp > 1: the factor each adapter keeps whole on every TP rank (``lora_A`` of
    a column-parallel base, ``lora_B`` of a row-parallel one) gets a partial sum for gradient,
    summed over the TP group once per step, when FSDP2 redistributes the gradient to the
    parameter's placement before reducing it (the optimizer step without FSDP2).

    Its dtype: the compute dtype (the unsharded bf16 parameter's gradient) with FSDP and one
    micro-batch, the reduce dtype when FSDP2 accumulated micro-batches, else the stored one.
    """
    found = adapters(inputs)
    if not found:
        return []
    element = BYTES_PER_ELEMENT[inputs.precision]
    size = (element.stored if not inputs.fsdp
            else element.compute if inputs.accumulate == 1 else element.grad)
    total = sum(math.prod(x.replicated_factor.shape) for x in found) * size
    return [("tp", "all_reduce", "LoRA replicated factors' gradients (once per step)",
             len(found), total)]


def _block_linear_elements(inputs: PlanInputs) -> int:
    """Elements of one decoder block's linear weights on the busiest TP rank (what float8
    all-gathers in 1 byte): ``h·d·(2·q_r + 2·kv_r) + 3·h·I/t``."""
    cfg = inputs.config
    rank = busiest_rank(cfg, inputs.tp)
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    return (h * d * (2 * rank.q_heads + 2 * rank.kv_heads)
            + 3 * h * cfg.intermediate_size // inputs.tp)


def collectives(inputs: PlanInputs,
                shards: Optional[list[ParamShard]] = None) -> list[Collective]:
    """Collectives per optimizer step per rank: TP (per layer and outside the layers) and FSDP2."""
    t, m = inputs.tp, inputs.accumulate
    # (group, kind, where, calls per step, bytes of all those calls' whole tensors together)
    rows: list[tuple[str, str, str, int, int]] = []
    grid_rows = _grid_rows(inputs) if inputs.grid is not None and t > 1 else []
    if t > 1:
        rows += [("tp", kind, where, calls * m, calls * m * size)
                 for kind, where, calls, size in _tp_rows(inputs)]
        rows += _lora_rows(inputs)
    if inputs.fsdp and inputs.dp > 1:
        element = BYTES_PER_ELEMENT[inputs.precision]
        per_unit = {u: n for u, n in units(shards if shards is not None
                                           else param_shards(inputs)).items() if n}
        gathered = {u: n * inputs.dp for u, n in per_unit.items()}  # whole TP-local unit, padded
        total = sum(gathered.values())
        blocks = len([u for u in per_unit if u != ROOT_UNIT])
        # float8 all-gather: a block's linear weights travel in 1 byte, the rest (norms, root) not
        saved = (element.compute - 1) * _block_linear_elements(inputs) * blocks \
            if inputs.float8_all_gather else 0
        rows.append(("dp", "all_gather", "parameters, forward (every micro-batch)"
                     + (", block linears in float8" if saved else ""),
                     m * len(per_unit), m * (element.compute * total - saved)))
        if inputs.reshard_after_forward:  # the last block stays gathered for the start of backward
            last = [u for u in per_unit if u != ROOT_UNIT][-1:]
            again = saved * (blocks - len(last)) // blocks if blocks else 0
            rows.append(("dp", "all_gather", "parameters, backward (resharded after forward)",
                         m * (len(per_unit) - len(last)),
                         m * (element.compute * (total - sum(gathered[u] for u in last))
                              - again)))
        rows.append(("dp", "reduce_scatter", "gradients (last micro-batch only)", len(per_unit),
                     element.grad * total))
    out = list(grid_rows)
    for group, kind, where, calls, size in rows:
        link = group_link(inputs, group)
        sent = ring_bytes(kind, t if group == "tp" else inputs.dp, size)
        seconds = sent / link.effective_bandwidth + calls * link.latency
        out.append(Collective(group, kind, where, calls, size // calls, link.name, sent, seconds))
    return out
