"""Step time of one layout and the throughput it implies (overlap assumptions in docs/planner.md).

Owns :class:`Estimate` and :func:`estimate`: compute at the accelerator's sustained peak, exposed
tensor-parallel communication, the FSDP2 traffic that does not hide under compute, and the
memory-bound optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_tp.planner.communication import Collective, group_link, ring_bytes
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import ROOT_UNIT, ParamShard, busiest_rank, units
from lightning_tp.planner.modes import BYTES_PER_ELEMENT, RECOMPUTE
from lightning_tp.training.callbacks import mfu

__all__ = ["Estimate", "compute_seconds", "estimate", "rank_flops"]


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


def rank_flops(inputs: PlanInputs, even: bool = False) -> tuple[float, float]:
    """``(block matmul FLOPs, other FLOPs)`` per token on the busiest TP rank, recomputation
    included.

    Block matmuls: ``6·L·h·(d·(2·q_r + 2·kv_r) + 3·I/t)``; attention ``12·L·q_r·d·s``; lm_head
    ``6·h·V_r`` (tied or not, the matmul runs); norms ``6·(2·L + 1)·h/t``. ``q_r``, ``kv_r``,
    ``V_r`` are the busiest rank's heads and vocabulary rows
    (:func:`~lightning_tp.planner.layout.busiest_rank`); ``even=True`` gives the same with
    ``nh/t``, ``nkv/t`` and ``V/t`` instead, the even split the waste is measured against.
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
    linear = 6 * layers * block_linear  # the decoder blocks' matmuls (float8 under float8)
    other = 3 * attention_fwd + 6 * h * vocab + 6 * (2 * layers + 1) * h / t
    if RECOMPUTE[inputs.activation_checkpointing].forward:  # one more forward of every layer
        linear += 2 * layers * block_linear
        other += attention_fwd
    return linear, other


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
    return (inputs.config.flops_per_token(inputs.seq_len), inputs.tp * sum(flops),
            compute_seconds(inputs, flops))


def _fsdp_exposed_s(inputs: PlanInputs, shards: list[ParamShard], fsdp: float, compute: float,
                    tp_comm: float) -> float:
    """Seconds of FSDP2 traffic the step waits for.

    FSDP2 prefetches the next unit while one computes: only the first all-gather (the root unit:
    embeddings and lm_head) and the last reduce-scatter (the root again) wait, plus whatever does
    not fit under compute and TP communication.
    """
    element = BYTES_PER_ELEMENT[inputs.precision]
    root = units(shards)[ROOT_UNIT] * inputs.dp
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
    optimizer = 7 * stored * sum(p.padded_shard for p in shards) / inputs.accelerator.hbm_bandwidth
    step = compute + tp_comm + exposed + optimizer
    tokens = inputs.tokens * inputs.dp * inputs.accumulate
    peak = inputs.accelerator.peak(inputs.precision)
    return Estimate(model_fpt, hw_fpt, compute, tp_comm, fsdp, exposed, optimizer, step, tokens,
                    tokens / step / inputs.world, mfu(tokens / step, model_fpt, inputs.world, peak))
