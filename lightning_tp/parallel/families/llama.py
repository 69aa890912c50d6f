"""The Llama family: the native :class:`~lightning_tp.models.Llama` and transformers' Llama,
Mistral, Qwen2 and Qwen3, one plan at the Megatron communication minimum per decoder layer.

* TP only: forward one all-reduce after ``o_proj`` and one after ``down_proj``; backward one
  all-reduce of the attention input gradient and one of the MLP input gradient.
* TP + SP: the all-reduces become an all-gather (before attention / MLP) and a reduce-scatter
  (after ``o_proj`` / ``down_proj``), forward and backward.

The trick that keeps the backward at one collective per module is ``PrepareModuleInput`` on
``self_attn`` and ``mlp``: the projections then receive a replicated DTensor, their input gradients
come back as ``Partial`` DTensors that autograd sums locally, and a single reduction runs at the
module boundary. Other families (:mod:`lightning_tp.parallel.families`) start from this plan.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
)

from lightning_tp.models.llama import Llama
from lightning_tp.parallel.families.base import Family, register_family
from lightning_tp.parallel.heads import HeadsColwise, HeadsRowwise, KVHeadsColwise
from lightning_tp.parallel.styles import HeadShardedNorm, ReplicateParallel, SequenceParallelNorm

__all__ = ["LLAMA", "head_counts", "llama_plan", "plan_for_llama"]


def llama_plan(
    *, sequence_parallel: bool = True, loss_parallel: bool = True, qk_norm: bool = False,
    num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
) -> dict[str, ParallelStyle]:
    """The minimum-communication plan for Llama-family models with Hugging Face module names.

    One plan serves the native Llama and transformers' Llama, Mistral, Qwen2 and (``qk_norm=True``)
    Qwen3. The embedding output stays whole and the sequence is split on entry to the first block (a
    local slice, no communication): Hugging Face models derive positions and the causal mask from
    the embedding output's length, which must be the full sequence. Cost against splitting in the
    embedding itself: one all-reduce instead of a reduce-scatter forward and one all-gather
    backward, per step, not per layer.
    """
    # Activations between blocks are sequence-sharded with SP and replicated without it.
    between = Shard(1) if sequence_parallel else Replicate()
    norm = SequenceParallelNorm() if sequence_parallel else ReplicateParallel()
    # With the head counts, projections whose heads tp cannot split evenly are replicated and each
    # rank computes its own heads (lightning_tp.parallel.heads); without them, split by head.
    heads, kv_heads = num_attention_heads, num_key_value_heads
    q = ColwiseParallel() if heads is None else HeadsColwise(heads)
    kv = ColwiseParallel() if kv_heads is None else KVHeadsColwise(kv_heads, heads)
    o = (RowwiseParallel(output_layouts=between) if heads is None
         else HeadsRowwise(heads, output_layouts=between))
    plan: dict[str, ParallelStyle] = {
        "model.embed_tokens": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate()
        ),
        "model.layers.*.input_layernorm": norm,
        # Attention is called with keyword arguments (`hidden_states=`) by both implementations.
        "model.layers.*.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": between},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        ),
        "model.layers.*.self_attn.q_proj": q,
        # Split by head; replicated with per-rank head selection when tp exceeds the KV heads.
        "model.layers.*.self_attn.k_proj": kv,
        "model.layers.*.self_attn.v_proj": kv,
        "model.layers.*.self_attn.o_proj": o,
        "model.layers.*.post_attention_layernorm": norm,
        "model.layers.*.mlp": PrepareModuleInput(
            input_layouts=(between,), desired_input_layouts=(Replicate(),)
        ),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(output_layouts=between),
        "model.norm": norm,
        # Loss parallel keeps the logits vocab-sharded (a DTensor) so cross entropy never gathers
        # them; without it, the logits are all-gathered into a plain tensor.
        "lm_head": ColwiseParallel(
            input_layouts=between,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sequence_parallel:
        plan["model.layers.0"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
        )
    if qk_norm:
        plan["model.layers.*.self_attn.q_norm"] = HeadShardedNorm()
        plan["model.layers.*.self_attn.k_norm"] = HeadShardedNorm()
    return plan


def head_counts(model: nn.Module) -> dict[str, int]:
    """``num_attention_heads`` / ``num_key_value_heads`` of ``model.config`` (those it has)."""
    config = getattr(model, "config", None)
    return {f: getattr(config, f) for f in ("num_attention_heads", "num_key_value_heads")
            if isinstance(getattr(config, f, None), int)}


def plan_for_llama(model: nn.Module, *, sequence_parallel: bool, loss_parallel: bool,
                   **_: Any) -> dict[str, ParallelStyle]:
    """:func:`llama_plan` with ``model``'s head counts, and Qwen3's per-head q/k norms if it has
    them."""
    return llama_plan(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel,
                      qk_norm=hasattr(model.get_submodule("model.layers.0.self_attn"), "q_norm"),
                      **head_counts(model))


LLAMA = register_family(Family(
    "llama", ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    plan_for_llama, native=(Llama,)))
