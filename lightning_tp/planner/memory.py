"""Memory one rank needs for one layout: parameters, gradients, optimizer state, FSDP2 buffers and
activations (formulas and sources in docs/planner.md).

Owns :func:`layer_activation_bytes` (what one decoder layer saves for backward), :func:`memory`
(the per-rank total by part) and :func:`fits` (against the device with its headroom).
"""

from __future__ import annotations

from typing import Optional

from lightning_tp.parallel.heads import head_layout
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import ParamShard, busiest_rank, units
from lightning_tp.planner.modes import BYTES_PER_ELEMENT

__all__ = ["activations", "fits", "layer_activation_bytes", "memory"]


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
      SP);
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
    """
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
        return parts
    parts.update({
        "2 RMSNorm (input, rsqrt)": 2 * (a * e * h // ts + 4 * e // ts),
        "2 gathered norm outputs (whole)": 2 * a * e * h,
        "MLP (gate, up, silu, product)": 4 * a * e * inter // t,
    })
    heads = head_layout(cfg.num_attention_heads, cfg.num_key_value_heads, t)
    # index_select of a replicated weight makes a new tensor, which the matmul saves (selective
    # and full recompute it)
    selected = 2 * q * heads.q_replicated + 2 * kv * heads.kv_replicated
    if selected and not even:
        parts["selected rows of replicated projections"] = a * h * selected
    return parts


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
    out = {
        "decoder layers (saved)": layers * per_layer,
        # token ids for the embedding backward; final norm as in a layer; lm_head's whole
        # (gathered) input
        "embedding, final norm, lm_head input":
            8 * e + (4 + a) * e * h // ts + 4 * e // ts + a * e * h,
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
    out["transient (max of loss backward, one layer's recompute)"] = max(loss_transient, recompute)
    return out


def memory(inputs: PlanInputs, shards: list[ParamShard]) -> dict[str, float]:
    """Bytes one rank holds at its peak, by part."""
    stored, compute, grad, optim = BYTES_PER_ELEMENT[inputs.precision]
    local = sum(p.padded_shard for p in shards)
    gathered = units(shards)
    largest = max(gathered.values())
    mem = {"parameters": stored * local, "gradients": grad * local,
           "optimizer (AdamW)": optim * local}
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
