"""Mixture-of-experts families: transformers' Mixtral and Qwen3-MoE, the Llama plan's attention
(head-aware: KV heads fewer than tp, uneven query heads; Qwen3-MoE's per-head q/k norms) with its
MLP entries replaced by the MoE block's (:mod:`lightning_tp.parallel.experts`).

What they need beyond Llama, and why: each decoder layer's ``mlp`` is a sparse block, a router
(``mlp.gate``) and fused experts (``mlp.experts``) with 3D parameters. Every expert is split along
its intermediate dimension like a dense MLP (no expert parallelism), the router is replicated and
routes every token on every rank, and the block's partial output is reduced once after the
routing-weighted combine. Qwen3-MoE layers listed in ``mlp_only_layers`` (or off the
``decoder_sparse_step``) are dense and keep the Llama MLP entries.

Collectives per MoE layer beyond the Llama minimum: one all-reduce of the router weight gradient
(``num_experts · hidden`` elements), backward. The attention's extras are the Llama family's
(replicated projections, Qwen3's q/k norm gradients).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_tp.errors import PlanError
from lightning_tp.parallel.experts import ExpertsParallel, RouterParallel, moe_block_style
from lightning_tp.parallel.families.base import Family, register_family
from lightning_tp.parallel.families.llama import plan_for_llama

__all__ = ["MOE", "moe_plan"]

_DENSE_MLP = ("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _is_moe(mlp: nn.Module) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def moe_plan(model: nn.Module, *, sequence_parallel: bool, loss_parallel: bool,
             **_: Any) -> dict[str, ParallelStyle]:
    """:func:`~lightning_tp.parallel.families.llama.plan_for_llama` with each MoE layer's ``mlp``
    entries replaced by the router's, the experts' and the block's (dense layers keep theirs)."""
    config = getattr(model, "config", None)
    jitter = getattr(config, "router_jitter_noise", 0) or 0
    if jitter > 0:
        raise PlanError(
            f"{type(model).__name__} has router_jitter_noise={jitter}: in training each TP rank"
            " would draw its own noise and route the same token to different experts. Fix: set"
            " config.router_jitter_noise=0.")
    plan = plan_for_llama(model, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    dense = {k: plan.pop(f"model.layers.*.{k}") for k in _DENSE_MLP}
    between = Shard(1) if sequence_parallel else Replicate()
    layers = model.get_submodule("model.layers")
    sparse = [_is_moe(layer.mlp) for layer in layers]
    moe = {"mlp": moe_block_style(between), "mlp.gate": RouterParallel(),
           "mlp.experts": ExpertsParallel()}
    # One glob when every layer is alike; otherwise each layer its own entries.
    alike = all(sparse) or not any(sparse)
    prefixes = ["model.layers.*"] if alike else [f"model.layers.{i}" for i in range(len(sparse))]
    for i, prefix in enumerate(prefixes):
        entries = moe if sparse[i] else dense
        plan.update({f"{prefix}.{k}": style for k, style in entries.items()})
    return plan


MOE = register_family(Family(
    "moe", ("MixtralForCausalLM", "Qwen3MoeForCausalLM"), moe_plan,
    extras="one all-reduce of the router weight gradient per MoE layer, backward",
    sharded_dims=(
        ("num_attention_heads", "query heads (q_proj/o_proj are split by whole heads)"),
        ("num_key_value_heads", "key/value heads (k_proj/v_proj are split by head)"),
        ("intermediate_size", "MLP width (Mixtral's experts and Qwen3-MoE's dense layers are"
                              " split along it)"),
        ("moe_intermediate_size", "expert width (Qwen3-MoE's experts' gate/up/down are split"
                                  " along it)"))))
