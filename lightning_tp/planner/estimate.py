"""Step time of one layout and the throughput it implies (overlap assumptions in docs/planner.md).

Owns :class:`Estimate` and :func:`estimate`: compute at the accelerator's sustained peak, exposed
tensor-parallel communication, the FSDP2 traffic that does not hide under compute, and the
memory-bound optimizer step; under LoRA, the frozen base without weight gradients and the
adapters' rank-``r`` matmuls, which are bound by memory traffic (:func:`adapter_seconds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_tp.planner.communication import Collective, group_link, ring_bytes
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import ParamShard, adapters, busiest_rank, units
from lightning_tp.planner.memory import DROPOUT_MASK_BYTES
from lightning_tp.planner.modes import BYTES_PER_ELEMENT, RECOMPUTE
from lightning_tp.training.callbacks import mfu

__all__ = ["Estimate", "adapter_flops", "adapter_seconds", "compute_seconds", "elementwise_bytes",
           "estimate", "model_flops_per_token", "rank_flops"]


@dataclass(frozen=True)
class Estimate:
    """Step time split and the throughput it implies."""

    model_flops_per_token: float
    hardware_flops_per_token: float
    compute_s: float
    tp_comm_s: float
    fsdp_comm_s: float
    fsdp_exposed_s: float
    optimizer_s: float
    step_s: float
    tokens_per_step: int
    tokens_per_s_per_device: float
    mfu: float
    adapter_s: float = 0.0
    """LoRA: the adapters' matmuls, forward and backward (at the larger of their FLOP time and
    their memory traffic); 0 without LoRA."""
    elementwise_s: float = 0.0
    """Memory-bound traffic in the compute time: eager element-wise kernels and float8's casts
    (:func:`elementwise_bytes` at HBM bandwidth)."""


def rank_flops(inputs: PlanInputs, even: bool = False) -> tuple[float, float]:
    """``(block matmul FLOPs, other FLOPs)`` per token on the busiest TP rank, recomputation
    included.

    Block matmuls: ``6·L·h·(d·(2·q_r + 2·kv_r) + 3·I/t)``; attention ``12·L·q_r·d·s``; lm_head
    ``6·h·V_r`` (tied or not, the matmul runs); norms ``6·(2·L + 1)·h/t``. ``q_r``, ``kv_r``,
    ``V_r`` are the busiest rank's heads and vocabulary rows
    (:func:`~lightning_tp.planner.layout.busiest_rank`); ``even=True`` gives the same with
    ``nh/t``, ``nkv/t`` and ``V/t`` instead, the even split the waste is measured against.

    Under LoRA the frozen matmuls (block projections, lm_head) run forward and input gradient but
    no weight gradient: 4 FLOPs per weight per token instead of 6. The adapters' own FLOPs are
    :func:`adapter_flops`.
    """
    cfg, s, t, layers = inputs.config, inputs.seq_len, inputs.tp, inputs.config.num_hidden_layers
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    if even:
        q, kv, vocab = (cfg.num_attention_heads / t, cfg.num_key_value_heads / t,
                        cfg.vocab_size / t)
    else:
        rank = busiest_rank(cfg, t)
        q, kv, vocab = rank.q_heads, rank.kv_heads, rank.vocab_rows
    block_linear = h * d * (2 * q + 2 * kv) + 3 * h * cfg.intermediate_size / t
    attention_fwd = 4 * layers * q * d * s
    weights = 6 if inputs.lora is None else 4  # no weight gradient of a frozen matmul
    linear = weights * layers * block_linear  # the decoder blocks' matmuls (float8 under float8)
    other = 3 * attention_fwd + weights * h * vocab + 6 * (2 * layers + 1) * h / t
    if RECOMPUTE[inputs.activation_checkpointing].forward:  # one more forward of every layer
        linear += 2 * layers * block_linear
        other += attention_fwd
    return linear, other


def adapter_flops(inputs: PlanInputs) -> float:
    """FLOPs per token of every adapter on the busiest rank, recomputation included:
    ``6·r·(in + out)`` per adapted projection (forward, input gradient and weight gradient of
    both factors, ``in``/``out`` the rank's features,
    :class:`~lightning_tp.planner.layout.Adapter`), ``2·r·(in + out)`` more under full
    checkpointing."""
    if inputs.lora is None:
        return 0.0
    passes = 8 if RECOMPUTE[inputs.activation_checkpointing].forward else 6
    return passes * inputs.lora.rank * sum(x.in_local + x.out_local for x in adapters(inputs))


def adapter_seconds(inputs: PlanInputs) -> float:
    """Seconds per step of the adapters' matmuls on the busiest rank: the larger of their FLOPs at
    the sustained peak and their memory traffic at HBM bandwidth.

    A rank-``r`` matmul does ``2·r`` FLOPs per element it reads, far below the FLOPs per byte a
    GPU needs to be compute-bound, so its time is its traffic: per token, each adapted projection
    streams its input and its output ``3`` times each in the activation dtype (forward ``A·x``
    and the added ``B·(A·x)``; backward ``A``'s weight gradient and the input gradient it adds,
    ``B``'s weight and input gradients), once more under full checkpointing, and with dropout
    writes and reads its dropped copy and mask (``2·(a + m)·in``). A lower bound: PEFT runs the
    scaling and the addition as kernels of their own.
    """
    if inputs.lora is None:
        return 0.0
    a = BYTES_PER_ELEMENT[inputs.precision].compute
    passes = 4 if RECOMPUTE[inputs.activation_checkpointing].forward else 3
    per_token = 0.0
    for x in adapters(inputs):
        per_token += passes * a * (x.in_local + x.out_local)
        if inputs.lora.dropout:
            per_token += 2 * (a + DROPOUT_MASK_BYTES) * x.in_local
    tokens = inputs.accumulate * inputs.tokens
    flop_s = compute_seconds(inputs, (0.0, adapter_flops(inputs)))
    return max(flop_s, tokens * per_token / inputs.accelerator.hbm_bandwidth)


def elementwise_bytes(inputs: PlanInputs) -> dict[str, float]:
    """HBM bytes per step on the busiest rank of the memory-bound kernels the FLOP count leaves
    out, by source (docs/planner.md, "Step time and MFU"); ``a`` the activation bytes, ``n_q``,
    ``n_kv`` the rank's query and key widths, ``I_r = I/t``, ``h_s = h/t`` under SP (else ``h``):

    * **eager** (``compile=False``): each element-wise op of a block is its own kernel, reading
      its operands and writing its result; compiled, each chain is one kernel. What eager moves
      beyond the fused chains, per token and layer forward: the two RMSNorms ``2·32·h_s`` (fp32
      upcast, square, mean, scale, downcast, weight: 36 bytes per element against 4 fused),
      rotary embedding ``16·(n_q + n_kv)`` (negate, concatenate, two products, a sum: ``10·a``
      against ``2·a``), SiLU and product ``4·I_r`` (``5·a`` against ``3·a``); backward twice the
      forward, full checkpointing one forward more;
    * **float8** (torchao's dynamic tensorwise scaling, as torchtitan runs it): each block
      linear's input (under TP + SP the attention and MLP inputs once each, on the sequence
      shard, before their float8 all-gather) and, in backward, its output gradient are reduced
      for their amax and cast (``2·a + 1`` bytes per element), and the fp8 input and gradient
      are transposed for the weight gradient (``2`` bytes); the weights likewise, once per
      micro-batch (``2·a + 1 + 2`` bytes per element, the transposed copy for the input gradient).
    """
    cfg, t, layers = inputs.config, inputs.tp, inputs.config.num_hidden_layers
    a = BYTES_PER_ELEMENT[inputs.precision].compute
    rank = busiest_rank(cfg, t)
    d, h = cfg.resolved_head_dim, cfg.hidden_size
    nq, nkv, inter = rank.q_heads * d, rank.kv_heads * d, cfg.intermediate_size / t
    tokens = inputs.accumulate * inputs.tokens
    forward = 1 + (1 if RECOMPUTE[inputs.activation_checkpointing].forward else 0)
    out: dict[str, float] = {}
    if not inputs.compile:
        hs = h / t if inputs.sequence_parallel else h
        per_layer = 2 * 32 * hs + 16 * (nq + nkv) + 4 * inter
        out["eager element-wise kernels"] = (forward + 2) * per_layer * layers * tokens
    if inputs.float8:
        if t > 1 and inputs.sequence_parallel:  # cast once on the shard, gathered in float8
            ins = 2 * h / t + nq + inter  # attention and MLP inputs; o; down
        else:
            ins = 3 * h + nq + 2 * h + inter  # q, k, v on the norm output; o; gate, up; down
        outs = nq + 2 * nkv + h + 2 * inter + h
        cast = (2 * a + 1) * (forward * ins + outs) + 2 * (ins + outs)
        weights = (2 * a + 1 + 2) * (h * (2 * nq + 2 * nkv) + 3 * h * inter)
        out["float8 casts"] = layers * (cast * tokens + weights * inputs.accumulate)
    return out


def model_flops_per_token(inputs: PlanInputs) -> float:
    """Model FLOPs per token (torchtitan's convention, recomputation excluded):
    :meth:`LlamaConfig.flops_per_token`; under LoRA the frozen matmuls without weight gradients,
    ``4·(N − N_embedding)``, plus ``6·N_adapters``."""
    cfg = inputs.config
    full = cfg.flops_per_token(inputs.seq_len)
    if inputs.lora is None:
        return full
    found = adapters(inputs)
    trainable = sum(math.prod(x.a.shape) + math.prod(x.b.shape) for x in found)
    return full - 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size) + 6 * trainable


def compute_seconds(inputs: PlanInputs, flops: tuple[float, float]) -> float:
    """Seconds per optimizer step of ``(block matmul, other)`` FLOPs per token on one rank."""
    peak = inputs.accelerator.peak(inputs.precision)
    linear_peak = inputs.accelerator.peak_flops["fp8"] if inputs.float8 else peak
    linear, other = flops
    return (inputs.accumulate * inputs.tokens * (linear / linear_peak + other / peak)
            / inputs.efficiency)


def _compute_s(inputs: PlanInputs) -> tuple[float, float, float]:
    """(model FLOPs per token, hardware FLOPs per token, compute seconds per step); hardware
    FLOPs are the busiest rank's times tp (what the TP group executes if every rank were it)."""
    flops = rank_flops(inputs)
    return (model_flops_per_token(inputs), inputs.tp * (sum(flops) + adapter_flops(inputs)),
            compute_seconds(inputs, flops))


def _fsdp_exposed_s(inputs: PlanInputs, shards: list[ParamShard], fsdp: float, compute: float,
                    tp_comm: float) -> float:
    """Seconds of FSDP2 traffic the step waits for.

    FSDP2 prefetches the next unit while one computes: only the first all-gather (the root unit:
    embeddings and lm_head; under LoRA the first decoder block's adapters) and the last
    reduce-scatter (the same unit) wait, plus whatever does not fit under compute and TP
    communication.
    """
    element = BYTES_PER_ELEMENT[inputs.precision]
    root = next((n for n in units(shards).values() if n), 0) * inputs.dp
    link = group_link(inputs, "dp")
    first_last = (ring_bytes("all_gather", inputs.dp, element.compute * root)
                  + ring_bytes("reduce_scatter", inputs.dp, element.grad * root))
    first_last = first_last / link.effective_bandwidth + 2 * link.latency
    # TP collectives hide FSDP2 traffic only when the two run over different links (TP on NVLink,
    # FSDP on InfiniBand); on one link they queue behind each other.
    shared = group_link(inputs, "tp") is link and tp_comm > 0
    return max(0.0, fsdp - compute - (0.0 if shared else tp_comm)) + first_last


def estimate(inputs: PlanInputs, shards: list[ParamShard], comms: list[Collective]) -> Estimate:
    """The step time of ``inputs`` from its parameter shards and its collectives."""
    model_fpt, hw_fpt, compute = _compute_s(inputs)
    adapter = adapter_seconds(inputs)
    elementwise = sum(elementwise_bytes(inputs).values()) / inputs.accelerator.hbm_bandwidth
    compute += adapter + elementwise
    tp_comm = sum(c.seconds for c in comms if c.group == "tp")
    if inputs.async_tp:
        # the per-layer collectives hide under the matmuls they feed, as far as those last
        layer_comm = sum(c.seconds for c in comms
                         if c.group == "tp" and c.where.startswith("decoder layers"))
        tp_comm += max(0.0, layer_comm - compute) - layer_comm
    dp_rows = [c for c in comms if c.group == "dp"]
    fsdp = sum(c.seconds for c in dp_rows)
    exposed = _fsdp_exposed_s(inputs, shards, fsdp, compute, tp_comm) if dp_rows else 0.0
    stored = BYTES_PER_ELEMENT[inputs.precision].stored
    # AdamW (foreach) reads parameter, gradient and two moments and writes three: memory-bound.
    trainable = sum(p.padded_shard for p in shards if p.trainable)
    optimizer = 7 * stored * trainable / inputs.accelerator.hbm_bandwidth
    step = compute + tp_comm + exposed + optimizer
    tokens = inputs.tokens * inputs.dp * inputs.accumulate
    peak = inputs.accelerator.peak(inputs.precision)
    return Estimate(model_fpt, hw_fpt, compute, tp_comm, fsdp, exposed, optimizer, step, tokens,
                    tokens / step / inputs.world, mfu(tokens / step, model_fpt, inputs.world, peak),
                    adapter_s=adapter, elementwise_s=elementwise)
