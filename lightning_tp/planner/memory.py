"""Memory one rank needs for one layout: parameters, gradients, optimizer state, FSDP2 buffers and
activations (formulas and sources in docs/planner.md).

Owns :func:`layer_activation_bytes` (what one decoder layer saves for backward), :func:`memory`
(the per-rank total by part) and :func:`fits` (against the device with its headroom), for full
training and for LoRA (:func:`lora_activation_bytes`: what the adapters add to a layer and what the
frozen base no longer keeps).
"""

from __future__ import annotations

from typing import Optional

from lightning_tp.parallel.heads import head_layout
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import Adapter, ParamShard, adapters, busiest_rank, units
from lightning_tp.planner.modes import BYTES_PER_ELEMENT

__all__ = ["DROPOUT_MASK_BYTES", "activations", "fits", "grid_layer_activation_bytes",
           "layer_activation_bytes", "lora_activation_bytes", "memory", "sharded_saves"]

DROPOUT_MASK_BYTES = 1
"""Bytes per element of the mask an adapter's input dropout keeps for backward: a bool tensor
(:class:`lightning_tp.parallel.lora._DroppedLinear`, on every device)."""

FROZEN_BASE = "frozen base (TP shards, outside FSDP2)"
"""The memory part of the frozen base under LoRA: stored in the compute dtype
(:func:`lightning_tp.parallel.parallelize.freeze_in`), no gradient, no optimizer state."""


def sharded_saves(inputs: PlanInputs, mode: Optional[str] = None) -> bool:
    """Whether the two gathered block inputs are kept as their sequence shard and all-gathered
    again in backward (``save_sharded_inputs`` under SP, no recompute, tp > 1:
    :mod:`lightning_tp.parallel.sharded_saves`)."""
    mode = mode or inputs.activation_checkpointing
    return (inputs.save_sharded_inputs and inputs.sequence_parallel and inputs.tp > 1
            and mode == "none")


def _gathered_name(inputs: PlanInputs, mode: Optional[str] = None) -> str:
    return ("2 norm outputs (sequence shards, regathered in backward)"
            if sharded_saves(inputs, mode) else "2 gathered norm outputs (whole)")


def layer_activation_bytes(inputs: PlanInputs, mode: Optional[str] = None,
                           even: bool = False) -> dict[str, float]:
    """Bytes one decoder layer keeps for backward, per micro-batch, on one rank, by tensor.

    Counted from what autograd saves in ``lightning_tp.models.llama`` (checked against
    ``torch.autograd.graph.saved_tensors_hooks`` in the tests). ``E = b·s`` tokens, ``a`` =
    activation bytes, ``t`` = tp, ``t_s`` = t under SP (norms and residuals sequence-sharded)
    else 1:

    * each RMSNorm: its input ``a·E·h/t_s`` and one fp32 rsqrt per token ``4·E/t_s`` (it normalises
      in fp32 but does not keep the fp32 copy);
    * each norm output as the colwise projections see it: ``a·E·h`` **whole** (all-gathered under
      SP); ``a·E·h/t``, its sequence shard, with ``save_sharded_inputs`` (:func:`sharded_saves`),
      which gathers it again in backward;
    * attention: q, k, v and the attention output ``a·E·(2·q_r + 2·kv_r)·d``, log-sum-exp
      ``4·b·q_r·s``, with ``q_r``/``kv_r`` the busiest rank's query / KV heads
      (:func:`~lightning_tp.planner.layout.busiest_rank`; ``nh/t`` and ``nkv/t`` when tp divides
      them);
    * MLP: gate, up, SiLU(gate), SiLU(gate)·up ``4·a·E·I/t``;
    * replicated projections (heads tp does not divide): the rank's selected weight rows, which
      ``F.linear`` saves like an input, ``a·h·d·(2·q_r)`` for q/o_proj and ``a·h·d·(2·kv_r)`` for
      k/v_proj.

    ``selective`` keeps the block input, the colwise matmul outputs (q, k, v, gate, up), the
    attention output and log-sum-exp, and the reduce-scatter (all-reduce) outputs of o_proj and
    down_proj; it recomputes norms, RoPE, SiLU, products and all-gathers. ``full`` keeps only the
    block input. ``even=True``: the same with ``nh/t`` and ``nkv/t`` heads and no replicated
    projection, the even split the waste is measured against (fractional bytes).

    Under a 2D grid (``inputs.grid``): :func:`grid_layer_activation_bytes`.
    """
    if inputs.grid is not None:
        return grid_layer_activation_bytes(inputs, mode)
    cfg, t, a = inputs.config, inputs.tp, BYTES_PER_ELEMENT[inputs.precision].compute
    ts = t if inputs.sequence_parallel else 1
    e, h, d = inputs.tokens, cfg.hidden_size, cfg.resolved_head_dim
    b, s = inputs.batch_size, inputs.seq_len
    rank = busiest_rank(cfg, t)
    q_heads, kv_heads = ((cfg.num_attention_heads / t, cfg.num_key_value_heads / t) if even
                         else (rank.q_heads, rank.kv_heads))
    q, kv, inter = q_heads * d, kv_heads * d, cfg.intermediate_size
    mode = mode or inputs.activation_checkpointing
    block_input = a * e * h // ts
    if mode == "full":
        return {"block input": block_input}
    parts = {
        "q, k, v": a * e * (q + 2 * kv),
        "attention output + lse": a * e * q + 4 * b * q_heads * s,
    }
    if mode == "selective":
        parts.update({"block input": block_input,
                      "o_proj, down_proj outputs (reduced)": 2 * a * e * h // ts,
                      "gate, up": 2 * a * e * inter // t})
        return parts | lora_activation_bytes(inputs, mode, even)
    parts.update({
        "2 RMSNorm (input, rsqrt)": 2 * (a * e * h // ts + 4 * e // ts),
        _gathered_name(inputs, mode): 2 * a * e * h // (t if sharded_saves(inputs, mode) else 1),
        "MLP (gate, up, silu, product)": 4 * a * e * inter // t,
    })
    heads = head_layout(cfg.num_attention_heads, cfg.num_key_value_heads, t)
    # index_select of a replicated weight makes a new tensor, which the matmul saves (selective
    # and full recompute it); a frozen weight too, for the input gradient
    selected = 2 * q * heads.q_replicated + 2 * kv * heads.kv_replicated
    if selected and not even:
        parts["selected rows of replicated projections"] = a * h * selected
    if inputs.lora is not None:
        parts.update(_frozen_inputs(inputs, _layer_adapters(inputs), mode))
        parts = {k: v for k, v in parts.items() if v}
    return parts | lora_activation_bytes(inputs, mode, even)


def grid_layer_activation_bytes(inputs: PlanInputs,
                                mode: Optional[str] = None) -> dict[str, float]:
    """What one decoder layer keeps for backward per micro-batch on one device of the 2D grid
    ``(r, c)`` (``t = r·c``; docs/2d.md), in the terms of :func:`layer_activation_bytes`:

    * each RMSNorm: its input, the residual ``[b, s/r, h/c]``, ``a·E·h/t``, and one fp32 rsqrt
      per local token ``4·E/r``;
    * each norm output as the projections see it, gathered over R: ``[b, s, h/c]``, ``a·E·h/c``;
    * q, k, v and the attention output: ``a·E·(2·q + 2·k)/t``, log-sum-exp ``4·b·(nh/t)·s``;
    * MLP: gate, up, SiLU(gate), SiLU(gate)·up ``4·a·E·F/t``;
    * at ``c > 1``, o_proj's and down's inputs gathered over C, which their matmuls keep:
      ``[b, s, q/r]`` and ``[b, s, F/r]``, ``a·E·(q + F)/r`` (at ``c = 1`` they are the
      attention output and the product themselves, and the figures are the 1D layer's).

    ``full`` keeps the block input ``a·E·h/t``. ``selective`` is refused under 2D
    (:func:`~lightning_tp.planner.grid.grid_problems`)."""
    r, c = inputs.grid
    cfg, t, a = inputs.config, r * c, BYTES_PER_ELEMENT[inputs.precision].compute
    e, h, d = inputs.tokens, cfg.hidden_size, cfg.resolved_head_dim
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    if (mode or inputs.activation_checkpointing) == "full":
        return {"block input": a * e * h / t}
    parts = {
        "2 RMSNorm (input, rsqrt)": 2 * (a * e * h / t + 4 * e / r),
        "2 norm outputs gathered over R [b, s, h/c]": 2 * a * e * h / c,
        "q, k, v": a * e * (q + 2 * kv) / t,
        "attention output + lse": (a * e * q / t
                                   + 4 * inputs.batch_size * cfg.num_attention_heads / t
                                   * inputs.seq_len),
        "MLP (gate, up, silu, product)": 4 * a * e * inter / t,
    }
    if c > 1:
        parts["o_proj, down inputs gathered over C [b, s, q/r], [b, s, F/r]"] = (
            a * e * (q + inter) / r)
    return parts


def _layer_adapters(inputs: PlanInputs) -> list[Adapter]:
    """The adapters of the first decoder layer (every layer has the same)."""
    found = adapters(inputs)
    return [x for x in found if x.unit == found[0].unit] if found else []


def _frozen_inputs(inputs: PlanInputs, layer: list[Adapter],
                   mode: Optional[str] = None) -> dict[str, float]:
    """The projection inputs of a layer under LoRA (replacing the full-training entries): a
    matmul with a frozen weight keeps only the weight, so a projection's input stays only where
    an adapter's ``lora_A`` keeps it (with or without dropout: the dropout keeps a mask, not a
    dropped copy); the attention output stays in any case (attention keeps it).
    ``save_sharded_inputs`` packs every saved tensor that shares the gathered input's storage as
    the sequence shard, ``lora_A``'s too (its input is the gathered tensor itself when the
    adapters are in the compute dtype, as FSDP2 casts them), so that row divides by ``t``."""
    cfg, t, a = inputs.config, inputs.tp, BYTES_PER_ELEMENT[inputs.precision].compute
    e, h, inter = inputs.tokens, cfg.hidden_size, cfg.intermediate_size
    plain = list(layer)
    norms = (any(x.colwise and x.attention for x in plain)
             + any(x.colwise and not x.attention for x in plain))
    product = any(not x.colwise and not x.attention for x in plain)
    if sharded_saves(inputs, mode):
        kept = {"norm outputs kept for lora_A (sequence shards)": norms * a * e * h // t}
    else:
        kept = {"gathered norm outputs kept for lora_A (whole)": norms * a * e * h}
    return {_gathered_name(inputs, mode): 0, **kept,
            "MLP (gate, up, silu, product)": 0,
            "MLP (gate, up, silu)": 3 * a * e * inter // t,
            "MLP product kept for down_proj's lora_A": product * a * e * inter // t}


def lora_activation_bytes(inputs: PlanInputs, mode: Optional[str] = None,
                          even: bool = False) -> dict[str, float]:
    """What the adapters of one decoder layer keep for backward, per micro-batch, on the busiest
    rank (empty without LoRA); counted, like :func:`layer_activation_bytes`, from what autograd
    and the selective policy keep (checked in the tests).

    For each adapted projection, ``in``/``out`` its busiest rank's input and output features
    (:class:`~lightning_tp.planner.layout.Adapter`) and ``r`` the rank:

    * ``lora_A``'s output, which ``lora_B`` keeps: ``a·E·r``;
    * with dropout, its mask ``m·E·in`` (``m`` = :data:`DROPOUT_MASK_BYTES`; the input itself is
      kept once, as without dropout);
    * the selected rows of the factor that follows a replicated base: ``a·r·out``
      (column-parallel) or ``a·r·in`` (row-parallel);
    * ``selective`` (the op policy keeps matmul outputs that are not partial sums over DTensor
      shards): ``lora_A``'s output, ``lora_B``'s output ``a·E·out`` and, for a row-parallel
      projection at tp > 1, whose base and adapters multiply local tensors before the one
      reduction, the base's partial sum ``a·E·out`` too; ``full``: nothing (the block input).

    ``even`` leaves out the selected rows (the even split has none).
    """
    lora = inputs.lora
    mode = mode or inputs.activation_checkpointing
    if lora is None or mode == "full":
        return {}
    a, e, r = BYTES_PER_ELEMENT[inputs.precision].compute, inputs.tokens, lora.rank
    layer = _layer_adapters(inputs)
    parts = {"LoRA: lora_A outputs (r wide)": len(layer) * a * e * r}
    if mode == "selective":
        row_partial = [x for x in layer if not x.colwise and inputs.tp > 1]
        parts["LoRA: lora_B outputs, row-parallel partial sums (kept matmuls)"] = (
            sum(a * e * x.out_local for x in layer) + sum(a * e * x.out_local for x in row_partial))
        return parts
    if lora.dropout:
        parts["LoRA: dropout masks"] = sum(DROPOUT_MASK_BYTES * e * x.in_local for x in layer)
    selected = sum(a * r * (x.out_local if x.colwise else x.in_local)
                   for x in layer if x.replicated)
    if selected and not even:
        parts["LoRA: selected rows of replicated projections' factors"] = selected
    return parts


def _layer0_savings(inputs: PlanInputs) -> float:
    """What layer 0 keeps less than the others under LoRA: its input, the frozen embedding's
    output, needs no gradient, so its first norm keeps nothing. (Without adapters on q/k/v, more
    of layer 0's attention needs no gradient; the planner still counts it.)"""
    cfg, a = inputs.config, BYTES_PER_ELEMENT[inputs.precision].compute
    ts = inputs.tp if inputs.sequence_parallel else 1
    e, h = inputs.tokens, cfg.hidden_size
    return a * e * h // ts + 4 * e // ts


def activations(inputs: PlanInputs, even: bool = False) -> dict[str, float]:
    """Peak activation bytes per rank for one micro-batch, by part (see docs/planner.md); ``even``
    as in :func:`layer_activation_bytes`, with ``V/t`` vocabulary rows."""
    cfg, t, a = inputs.config, inputs.tp, BYTES_PER_ELEMENT[inputs.precision].compute
    ts = t if inputs.sequence_parallel else 1
    e, h, layers = inputs.tokens, cfg.hidden_size, cfg.num_hidden_layers
    per_layer = sum(layer_activation_bytes(inputs, even=even).values())
    # the busiest rank's vocabulary rows, ceil(V / t), under loss parallel; all V without it
    vocab = busiest_rank(cfg, t).vocab_rows if inputs.loss_parallel else cfg.vocab_size
    if even and inputs.loss_parallel:
        vocab = cfg.vocab_size / t
    out = {"decoder layers (saved)": layers * per_layer}
    if inputs.lora is None:
        # token ids for the embedding backward; final norm as in a layer; lm_head's whole
        # (gathered) input
        out["embedding, final norm, lm_head input"] = (8 * e + (4 + a) * e * h // ts + 4 * e // ts
                                                       + a * e * h)
    else:
        # the frozen embedding keeps no token ids and the frozen lm_head no input
        out["final norm"] = (4 + a) * e * h // ts + 4 * e // ts
        if inputs.activation_checkpointing == "none":
            out["layer 0 (its input needs no gradient)"] = -_layer0_savings(inputs)
    out |= {
        # fp32 log-probabilities saved by cross entropy (vocab-sharded under loss parallel, whole
        # otherwise)
        "logits (fp32 log-probs)": 4 * e * vocab,
    }
    # The largest transient: at the start of backward the loss gradient (fp32) and its input
    # gradient (fp32) sit beside the saved log-probs; under checkpointing, one layer's recomputed
    # tensors during its backward.
    loss_transient = 8 * e * vocab
    recompute = 0
    if inputs.activation_checkpointing != "none":
        recompute = sum(layer_activation_bytes(inputs, "none", even).values())
    elif sharded_saves(inputs):  # one regathered input during its module's backward
        recompute = BYTES_PER_ELEMENT[inputs.precision].compute * e * h
    out["transient (max of loss backward, one layer's recompute)"] = max(loss_transient, recompute)
    return out


def memory(inputs: PlanInputs, shards: list[ParamShard]) -> dict[str, float]:
    """Bytes one rank holds at its peak, by part; under LoRA the frozen base (its TP shards in the
    compute dtype) and the adapters' parameters, gradients and AdamW state."""
    stored, compute, grad, optim = BYTES_PER_ELEMENT[inputs.precision]
    local = sum(p.padded_shard for p in shards if p.trainable)
    gathered = units(shards)
    largest = max(gathered.values())
    if inputs.lora is None:
        mem = {"parameters": stored * local, "gradients": grad * local,
               "optimizer (AdamW)": optim * local}
    else:
        mem = {FROZEN_BASE: compute * sum(p.padded_shard for p in shards if not p.trainable),
               "adapter parameters": stored * local, "adapter gradients": grad * local,
               "adapter optimizer (AdamW)": optim * local}
    if inputs.fsdp:
        # Two gathered units at a time (current + prefetched), the current unit's unsharded
        # gradient, and its reduce-scatter input in the reduce dtype.
        transient = (2 * compute + compute + grad) * largest * inputs.dp
        if not inputs.reshard_after_forward:  # every unit stays gathered from forward to backward
            transient += compute * sum(gathered.values()) * inputs.dp
        mem["FSDP2 gathered units (transient)"] = transient
        if inputs.accumulate > 1:
            # unsharded gradients accumulate in the reduce dtype until the last micro-batch
            mem["accumulated unsharded gradients"] = grad * sum(gathered.values()) * inputs.dp
    mem.update(activations(inputs))
    return mem


def fits(inputs: PlanInputs, total: int) -> bool:
    """Whether ``total`` bytes fit in the device's memory less the headroom."""
    return total <= (1 - inputs.memory_headroom) * inputs.accelerator.memory_bytes
