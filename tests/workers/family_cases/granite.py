"""Granite (family ``"granite"``): transformers' GraniteForCausalLM, tiny with Granite-3 2B/8B's 4:1 query/KV head ratio
(8 query / 2 KV heads) and its four multipliers away from 1, so that a multiplier lost or applied twice on a shard shows
in the logits and every gradient: embeddings x12, each sublayer output x0.22 before its residual add, attention scale
1/128 (not 1/sqrt(head_dim)), logits / 8. Tied embeddings, as released."""

from __future__ import annotations

import torch
from torch import nn

from . import VOCAB, Case

MULTIPLIERS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                   logits_scaling=8.0)


def _granite(layers: int) -> nn.Module:
    import transformers

    config = transformers.GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                        max_position_embeddings=64,
                                        tie_word_embeddings=True, attn_implementation="eager", **MULTIPLIERS)
    torch.manual_seed(0)
    return transformers.GraniteForCausalLM(config)


# Beyond the Llama minimum per layer, backward only: KV heads fewer than tp (4, 8) replicate k_proj/v_proj, one
# weight-gradient all-reduce each. The multipliers add none.
KV_REPLICATED = {"backward": {"allreduce_": 2}}

CASES = [Case("granite-8:2", "granite", _granite, tps=(2, 4, 8), extra_per_layer={4: KV_REPLICATED, 8: KV_REPLICATED})]
