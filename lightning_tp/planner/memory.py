"""Memory one rank needs for one layout: parameters, gradients, optimizer state, FSDP2 buffers and
activations (formulas and sources in docs/planner.md).

Owns :func:`layer_activation_bytes` (what one decoder layer saves for backward), :func:`memory`
(the per-rank total by part) and :func:`fits` (against the device with its headroom).
"""

from __future__ import annotations

from typing import Optional

from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import ParamShard, units
from lightning_tp.planner.modes import BYTES_PER_ELEMENT

__all__ = ["fits", "layer_activation_bytes", "memory"]


def layer_activation_bytes(inputs: PlanInputs, mode: Optional[str] = None) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward, per micro-batch, on one rank, by tensor.

    Counted from what autograd saves in ``lightning_tp.models.llama`` (checked against
    ``torch.autograd.graph.saved_tensors_hooks`` in the tests). ``E = b·s`` tokens, ``a`` =
    activation bytes, ``t`` = tp, ``t_s`` = t under SP (norms and residuals sequence-sharded)
    else 1:

    * each RMSNorm: its input ``a·E·h/t_s`` and one fp32 rsqrt per token ``4·E/t_s`` (it normalises
      in fp32 but does not keep the fp32 copy);
    * each norm output as the colwise projections see it: ``a·E·h`` **whole** (all-gathered under
      SP);
    * attention: q, k, v and the attention output ``a·E·(2·nh + 2·nkv)·d/t``, log-sum-exp
      ``4·b·nh·s/t``;
    * MLP: gate, up, SiLU(gate), SiLU(gate)·up ``4·a·E·I/t``.

    ``selective`` keeps the block input, the colwise matmul outputs (q, k, v, gate, up), the
    attention output and log-sum-exp, and the reduce-scatter (all-reduce) outputs of o_proj and
    down_proj; it recomputes norms, RoPE, SiLU, products and all-gathers. ``full`` keeps only the
    block input.
    """
    cfg, t, a = inputs.config, inputs.tp, BYTES_PER_ELEMENT[inputs.precision].compute
    ts = t if inputs.sequence_parallel else 1
    e, h, d = inputs.tokens, cfg.hidden_size, cfg.resolved_head_dim
    b, s = inputs.batch_size, inputs.seq_len
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    mode = mode or inputs.activation_checkpointing
    block_input = a * e * h // ts
    if mode == "full":
        return {"block input": block_input}
    parts = {
        "q, k, v": a * e * (q + 2 * kv) // t,
        "attention output + lse": a * e * q // t + 4 * b * cfg.num_attention_heads * s // t,
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
    return parts


def _activations(inputs: PlanInputs) -> dict[str, int]:
    """Peak activation bytes per rank for one micro-batch, by part (see docs/planner.md)."""
    cfg, t, a = inputs.config, inputs.tp, BYTES_PER_ELEMENT[inputs.precision].compute
    ts = t if inputs.sequence_parallel else 1
    e, h, layers = inputs.tokens, cfg.hidden_size, cfg.num_hidden_layers
    per_layer = sum(layer_activation_bytes(inputs).values())
    vocab_t = t if inputs.loss_parallel else 1
    out = {
        "decoder layers (saved)": layers * per_layer,
        # token ids for the embedding backward; final norm as in a layer; lm_head's whole
        # (gathered) input
        "embedding, final norm, lm_head input":
            8 * e + (4 + a) * e * h // ts + 4 * e // ts + a * e * h,
        # fp32 log-probabilities saved by cross entropy (vocab-sharded under loss parallel, whole
        # otherwise)
        "logits (fp32 log-probs)": 4 * e * cfg.vocab_size // vocab_t,
    }
    # The largest transient: at the start of backward the loss gradient (fp32) and its input
    # gradient (fp32) sit beside the saved log-probs; under checkpointing, one layer's recomputed
    # tensors during its backward.
    loss_transient = 8 * e * cfg.vocab_size // vocab_t
    recompute = 0
    if inputs.activation_checkpointing != "none":
        recompute = sum(layer_activation_bytes(inputs, "none").values())
    out["transient (max of loss backward, one layer's recompute)"] = max(loss_transient, recompute)
    return out


def memory(inputs: PlanInputs, shards: list[ParamShard]) -> dict[str, int]:
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
    mem.update(_activations(inputs))
    return mem


def fits(inputs: PlanInputs, total: int) -> bool:
    """Whether ``total`` bytes fit in the device's memory less the headroom."""
    return total <= (1 - inputs.memory_headroom) * inputs.accelerator.memory_bytes
