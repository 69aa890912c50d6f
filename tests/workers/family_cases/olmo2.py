"""OLMo-2 (post-norms, full-width q/k RMSNorms) at the head counts of OLMo-2-1B (16:16) and 13B (40:40). Beyond the
Llama minimum, per layer: the q_norm / k_norm sums of squares, one all-reduce each forward and one each backward."""

from __future__ import annotations

import torch
import transformers

from family_cases import VOCAB, Case

NORMS = {"forward": {"allreduce_": 2}, "backward": {"allreduce_": 2}}


def _olmo2(heads: int, head_dim: int = 2):
    def build(layers: int) -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.Olmo2Config(
            vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=32, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
            pad_token_id=0, eos_token_id=2,             attention_dropout=0.0)
        model = transformers.Olmo2ForCausalLM(config)
        with torch.no_grad():  # norm weights away from 1, so a wrongly sharded or unscaled one shows
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
        return model
    return build


CASES = [
    Case("olmo2-1b-16:16", "olmo2", _olmo2(16), extra_per_layer={tp: NORMS for tp in (2, 4, 8)}),
    Case("olmo2-13b-40:40", "olmo2", _olmo2(40), tps=(2, 4), extra_per_layer={tp: NORMS for tp in (2, 4)}),
]
