"""Gemma, Gemma-2 and Gemma-3 text models (family ``"gemma"``), tiny but with their checkpoints' head ratios, a
``head_dim`` other than ``hidden / heads`` (as in every released Gemma-2/3, and Gemma-7B) and, for Gemma-2/3, a
``query_pre_attn_scalar`` other than ``head_dim``, a sliding window of 4 (< SEQ) on the first layer and full attention
on the second; Gemma-2 with attention and final-logit soft-capping on; tied embeddings everywhere (as released)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import VOCAB, Case

LAYER_TYPES = ("sliding_attention", "full_attention")


def windowed(layers: int) -> dict[str, Any]:
    """Gemma-2/3's own attention settings: a sliding window below SEQ on every other layer, a query scale apart."""
    return dict(query_pre_attn_scalar=6, sliding_window=4, layer_types=[LAYER_TYPES[i % 2] for i in range(layers)])


def _build(family: str, heads: int, kv: int, hidden: int, head_dim: int, **extra: Any):
    def build(layers: int) -> nn.Module:
        import transformers

        config_cls, model_cls = {"gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
                                 "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                                 "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[family]
        config = config_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                            max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="eager",
                            **({} if family == "gemma" else windowed(layers)), **extra)
        torch.manual_seed(0)
        model = model_cls(config)
        with torch.no_grad():  # released norms are far from their zero init ((1 + weight) parametrisation)
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.5)
        return model

    return build


SOFTCAP = dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)

# Beyond the Llama minimum per layer, backward only: one all-reduce of each projection heads.py replicates (KV heads
# fewer than tp: k_proj, v_proj; uneven query heads: q_proj, o_proj too), as for Llama. Gemma's own additions (the
# sandwich norms, q_norm/k_norm, soft-capping, sliding windows, the scaled embedding) add none.
KV_REPLICATED = {"backward": {"allreduce_": 2}}

CASES = [
    # Gemma-2B: 8 query heads, 1 KV head (multi-query), replicated at every tp.
    Case("gemma-8:1", "gemma", _build("gemma", 8, 1, hidden=24, head_dim=8), tps=(2, 4),
         extra_per_layer={tp: KV_REPLICATED for tp in (2, 4, 8)}),
    # Gemma-2-2B: 8 query / 4 KV heads (head_dim 256 against hidden 2304); at tp 8 its KV heads would be replicated,
    # the layout gemma3-8:4 runs there.
    Case("gemma2-8:4", "gemma", _build("gemma2", 8, 4, hidden=32, head_dim=8, **SOFTCAP), tps=(2, 4),
         extra_per_layer={8: KV_REPLICATED}),
    # Gemma-2-9B: 16 query / 8 KV heads (head_dim 256 against hidden 3584).
    Case("gemma2-16:8", "gemma", _build("gemma2", 16, 8, hidden=48, head_dim=4, **SOFTCAP), tps=(2, 4, 8)),
    # Gemma-3-1B: 4 query / 1 KV head (head_dim 256 against hidden 1152): KV replicated at every tp; tp 8 exceeds
    # the query heads.
    Case("gemma3-4:1", "gemma", _build("gemma3", 4, 1, hidden=24, head_dim=8), tps=(2, 4),
         extra_per_layer={2: KV_REPLICATED, 4: KV_REPLICATED}),
    # Gemma-3-4B: 8 query / 4 KV heads (head_dim 256 against hidden 2560).
    Case("gemma3-8:4", "gemma", _build("gemma3", 8, 4, hidden=40, head_dim=8), tps=(2, 4, 8),
         extra_per_layer={8: KV_REPLICATED}),
    # Not a released shape: 6 query / 2 KV heads, split 2+2+1+1 at tp 4 (uneven query heads, a KV copy per query
    # head under the per-head k_norm), with final-logit soft-capping.
    Case("gemma3-6:2", "gemma", _build("gemma3", 6, 2, hidden=24, head_dim=8, final_logit_softcapping=3.0),
         tps=(2, 4), extra_per_layer={4: {"backward": {"allreduce_": 4}}}),
]
