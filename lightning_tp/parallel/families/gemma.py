"""The Gemma family: transformers' Gemma, Gemma-2 and Gemma-3 text models (``GemmaForCausalLM``,
``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``) on the Llama plan
(:func:`~lightning_tp.parallel.families.llama.llama_plan`) with the model's head counts, so KV
heads fewer than tp and uneven query heads work as for Llama.

What Gemma has beyond Llama, and what each costs:

* **Two more norms per layer, and a different one (Gemma-2/3).** ``post_attention_layernorm``
  normalises the attention output before the residual add (in Llama it is the MLP's input norm),
  ``pre_feedforward_layernorm`` is the MLP's input norm and ``post_feedforward_layernorm``
  normalises the MLP output. All are RMSNorms over the hidden dim on activations that are
  sequence-sharded with SP (replicated without), so they take the Llama norms' style; the two
  output norms return a plain local tensor, since the residual they are added to is one. No
  communication in forward; their weight gradients are partial sums over the sequence shards,
  left ``Partial`` like every other norm weight's.
* **Per-head q/k norms (Gemma-3).** ``q_norm``/``k_norm`` normalise each head over ``head_dim``
  after the transpose, on ``(bs, n_local_heads, seqlen, head_dim)``: a rank's own heads
  (:class:`HeadsFirstNorm`, Qwen3's :class:`~lightning_tp.parallel.styles.HeadShardedNorm` with the
  heads on dim 1). Each weight's gradient is a partial sum over the ranks' heads, left
  ``Partial`` like the other norms': no collective in the layer.
* **Local by construction:** attention logit soft-capping (per head, inside the attention),
  sliding windows (the mask, built from the whole embedding output on every rank), the
  ``(1 + weight)`` RMSNorm, ``head_dim`` independent of ``hidden / heads`` and
  ``query_pre_attn_scalar`` (the projections are split by ``head_dim`` rows either way).
* **Scaled embedding.** ``embed_tokens`` multiplies its lookup by ``sqrt(hidden)`` inside its own
  forward; under ``RowwiseParallel`` that multiplies the vocab-partial lookup by a scalar, which
  commutes with the all-reduce of the output: no extra communication.
* **Final logit soft-capping** (``tanh(logits / cap) * cap``) is elementwise, so it runs on the
  vocab-sharded logits under loss parallel without gathering them.
* **Tied embeddings:** ``embed_tokens`` and ``lm_head`` are both split on the vocab dim, one
  sharded tensor serves both.

Gemma (1) is Llama's layer with the scaled embedding, the ``(1 + weight)`` norm and tied
embeddings: the Llama plan as it is.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_tp.parallel.families.base import Family, register_family
from lightning_tp.parallel.families.llama import head_counts, llama_plan
from lightning_tp.parallel.styles import HeadShardedNorm, ReplicateParallel, SequenceParallelNorm

__all__ = ["GEMMA", "GEMMA_CLASSES", "HeadsFirstNorm", "gemma_plan"]

GEMMA_CLASSES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
"""The transformers classes of the family."""

_OUTPUT_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
"""Gemma-2/3 norms of a sublayer's output (Llama's ``post_attention_layernorm`` is the MLP's input
norm instead)."""


class HeadsFirstNorm(HeadShardedNorm):
    """A norm over ``head_dim`` of a rank's own heads laid out ``(bs, n_local_heads, seqlen,
    head_dim)`` (Gemma-3's ``q_norm``/``k_norm``, applied after the heads are transposed forward):
    :class:`~lightning_tp.parallel.styles.HeadShardedNorm` with the heads on dim 1, not 2 (which
    would label the sequence dim sharded)."""

    heads_dim = 1


def gemma_plan(model: nn.Module, *, sequence_parallel: bool, loss_parallel: bool,
               **_: Any) -> dict[str, ParallelStyle]:
    """:func:`llama_plan` with ``model``'s head counts, the extra norms of its decoder layer and
    Gemma-3's per-head q/k norms if it has them."""
    plan = llama_plan(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel,
                      **head_counts(model))
    layer = model.get_submodule("model.layers.0")
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma-2/3's sandwich norms
        # The sublayer output norms feed the residual add, a plain tensor: their output is local.
        # The MLP's input norm feeds PrepareModuleInput, as Llama's does.
        out_norm = (SequenceParallelNorm(use_local_output=True) if sequence_parallel
                    else ReplicateParallel())
        for name in _OUTPUT_NORMS:
            plan[f"model.layers.*.{name}"] = out_norm
        plan["model.layers.*.pre_feedforward_layernorm"] = plan["model.layers.*.input_layernorm"]
    for name in ("q_norm", "k_norm"):
        if hasattr(layer.self_attn, name):
            plan[f"model.layers.*.self_attn.{name}"] = HeadsFirstNorm()
    return plan


GEMMA = register_family(Family("gemma", GEMMA_CLASSES, gemma_plan))
