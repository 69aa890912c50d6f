"""The Llama family as controls of the family launches: transformers' Llama (split and with KV heads replicated),
Qwen3 with its per-head q/k norms, Mistral. The wider Llama-family parity is ``tests/workers/hf_parity.py``."""

from __future__ import annotations

import torch
import transformers

from family_cases import VOCAB, Case

SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=64)


def _llama(layers: int, heads: int = 8, kv: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv, head_dim=4)
    return transformers.LlamaForCausalLM(config)


def _qwen3(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**SMALL, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                      head_dim=4)
    return transformers.Qwen3ForCausalLM(config)


CASES = [
    Case("llama-8:4", "llama", _llama, tps=(2, 4)),
    # 8 query / 2 KV heads at tp 4: k/v replicated, one weight-gradient all-reduce each in backward
    Case("qwen3-8:2", "llama", _qwen3, tps=(2, 4), extra_per_layer={4: {"backward": {"allreduce_": 2}}}),
]
