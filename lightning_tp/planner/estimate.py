"""Step time of one layout and the throughput it implies (overlap assumptions in docs/planner.md).

Owns :class:`Estimate` and :func:`estimate`: compute at the accelerator's sustained peak, exposed
tensor-parallel communication, the FSDP2 traffic that does not hide under compute, and the
memory-bound optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_tp.planner.communication import Collective, group_link, ring_bytes
from lightning_tp.planner.inputs import PlanInputs
from lightning_tp.planner.layout import ROOT_UNIT, ParamShard, units
from lightning_tp.planner.modes import BYTES_PER_ELEMENT, RECOMPUTE
from lightning_tp.training.callbacks import mfu

__all__ = ["Estimate", "estimate"]


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


def _compute_s(inputs: PlanInputs) -> tuple[float, float, float]:
    """(model FLOPs per token, hardware FLOPs per token, compute seconds per step)."""
    cfg, s, layers = inputs.config, inputs.seq_len, inputs.config.num_hidden_layers
    model_fpt = cfg.flops_per_token(s)
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    block_linear = (h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
                    + 3 * h * cfg.intermediate_size)
    attention_fwd = 4 * layers * cfg.num_attention_heads * d * s
    linear_fpt = 6 * layers * block_linear  # the decoder blocks' matmuls (float8 under float8)
    other_fpt = model_fpt - linear_fpt  # attention and lm_head (bf16 either way)
    if RECOMPUTE[inputs.activation_checkpointing].forward:  # one more forward of every layer
        linear_fpt += 2 * layers * block_linear
        other_fpt += attention_fwd
    peak = inputs.accelerator.peak(inputs.precision)
    linear_peak = inputs.accelerator.peak_flops["fp8"] if inputs.float8 else peak
    compute = (inputs.accumulate * inputs.tokens / inputs.tp
               * (linear_fpt / linear_peak + other_fpt / peak) / inputs.efficiency)
    return model_fpt, linear_fpt + other_fpt, compute


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
