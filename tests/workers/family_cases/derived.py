"""transformers classes no named family covers, planned from their own ``base_model_tp_plan`` and structure
(``lightning_tp/parallel/families/derived.py``): Starcoder2 (a two-matrix MLP with biases, LayerNorm) and Helium fit
the minimum; GLM's fused ``gate_up_proj`` only fits the per-projection mapping, whose extra all-gather each way the
rank-0 warning names."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from family_cases import VOCAB, Case

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB,
             head_dim=8, pad_token_id=0, max_position_embeddings=64)
DROPOUTS = ("attention_dropout", "hidden_dropout", "residual_dropout", "embedding_dropout", "resid_pdrop", "embd_pdrop")


def _derived(model_type: str, **extra: int):
    def build(layers: int) -> torch.nn.Module:
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, **{**SMALL, **extra, "num_hidden_layers": layers})
        for name in DROPOUTS:
            if hasattr(config, name):
                setattr(config, name, 0.0)
        return AutoModelForCausalLM.from_config(config)
    return build


GLM_EXTRA = {"forward": {"all_gather_into_tensor": 1}, "backward": {"all_gather_into_tensor": 1}}
CASES = [
    Case("derived-starcoder2-8:4", "derived", _derived("starcoder2"), tps=(2, 4)),
    # 2 KV heads at tp 4: k/v replicated through the same head-aware styles as the Llama plan
    Case("derived-helium-8:2", "derived", _derived("helium", num_key_value_heads=2), tps=(2, 4),
         extra_per_layer={4: {"backward": {"allreduce_": 2}}}),
    Case("derived-glm-8:4", "derived", _derived("glm"), tps=(2, 4), extra_per_layer={2: GLM_EXTRA, 4: GLM_EXTRA}),
]
