"""Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``) at the head ratios of Phi-3-mini (32:32), Phi-3-medium (40:10) and
Phi-3.5-mini / Phi-4-mini (24:8), and with 9 query heads. Gradients of the fused weights come back in the grouped row
order: the worker compares them after the styles' ``model_layout``."""

from __future__ import annotations

import torch
import transformers

from family_cases import VOCAB, Case


def _phi3(heads: int, kv: int, head_dim: int = 2):
    def build(layers: int) -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.Phi3Config(
            vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=32, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
            pad_token_id=0, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
        return transformers.Phi3ForCausalLM(config)
    return build


# The fused qkv_proj replicated with each rank's heads selected: its weight gradient all-reduced (one per layer), and
# o_proj's too when the query heads are uneven.
CASES = [
    Case("phi3-mini-8:8", "phi3", _phi3(8, 8), tps=(2, 4)),
    # 10 KV heads: split at tp 2, replicated at 4 and 8 (one KV copy per local query head)
    Case("phi3-medium-40:10", "phi3", _phi3(40, 10), extra_per_layer={4: {"backward": {"allreduce_": 1}},
                                                                     8: {"backward": {"allreduce_": 1}}}),
    Case("phi3.5-mini-24:8", "phi3", _phi3(24, 8), tps=(2, 4)),
    # 9 query heads (as SmolLM2's): uneven at every tp
    Case("phi3-9:3", "phi3", _phi3(9, 3), extra_per_layer={tp: {"backward": {"allreduce_": 2}} for tp in (2, 4, 8)}),
]
