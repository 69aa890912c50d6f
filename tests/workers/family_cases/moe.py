"""Mixtral and Qwen3-MoE (family ``"moe"``): tiny, with their checkpoints' head ratios, 4 experts routed top-2 and a
small expert intermediate size (32: 4 per rank at tp 8, the fewest whose fp32 rows have the 16-byte strides
transformers' default grouped_mm experts need). Mixtral-8x7B: 32 query / 8 KV heads (here 8:2);
Qwen3-30B-A3B: 32 query / 4 KV heads (here 8:1), head_dim 128 against hidden 2048 (here 8 against 32), per-head
q_norm/k_norm, normalised top-k weights. One Qwen3-MoE case keeps layer 0 dense (``mlp_only_layers``), so the per-layer
count (2 layers minus 1) is that of the MoE layer next to a dense one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import VOCAB, Case

EXPERTS = dict(num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
               attn_implementation="eager")


def _mixtral(layers: int) -> nn.Module:
    import transformers

    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                        head_dim=4, num_local_experts=4, **EXPERTS)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe(**extra: Any):
    def build(layers: int) -> nn.Module:
        import transformers

        config = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                                             moe_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=8,
                                             num_key_value_heads=1, head_dim=8, num_experts=4, norm_topk_prob=True,
                                             **EXPERTS, **extra)
        torch.manual_seed(0)
        return transformers.Qwen3MoeForCausalLM(config)

    return build


# Beyond the Llama minimum per MoE layer, backward only: one all-reduce of the router weight gradient; and where tp
# exceeds the KV heads (Mixtral at 4 and 8, Qwen3-MoE everywhere), k_proj/v_proj replicated, one all-reduce each.
ROUTER = {"backward": {"allreduce_": 1}}
ROUTER_KV = {"backward": {"allreduce_": 3}}

CASES = [
    Case("mixtral-8:2", "moe", _mixtral, tps=(2, 4, 8), extra_per_layer={2: ROUTER, 4: ROUTER_KV, 8: ROUTER_KV}),
    Case("qwen3moe-8:1", "moe", _qwen3_moe(), tps=(2, 4, 8),
         extra_per_layer={2: ROUTER_KV, 4: ROUTER_KV, 8: ROUTER_KV}),
    Case("qwen3moe-8:1-dense0", "moe", _qwen3_moe(mlp_only_layers=[0]), tps=(2, 4),
         extra_per_layer={2: ROUTER_KV, 4: ROUTER_KV}),
]
