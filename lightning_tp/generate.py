"""Greedy text generation that works on a sharded model: every rank runs the same steps together.

No KV cache: each step re-runs the whole (short) context. Meant for samples after training, not serving.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_tp.data.tokenizers import Tokenizer

__all__ = ["generate"]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48,
             pad_to_multiple_of: int = 1, max_context: int | None = None) -> str:
    """Continue ``prompt`` greedily; returns only the new text.

    Under tensor parallelism call it on every rank (the forward passes are collective). Inputs are padded
    on the right to a multiple of ``pad_to_multiple_of`` (the TP degree under sequence parallelism); with
    a causal model, padding after the last real token does not change its logits.
    """
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt, bos=True)
    device = next(model.parameters()).device
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            context = ids[-max_context:] if max_context else ids
            padded = context + [tokenizer.pad_id] * (-len(context) % pad_to_multiple_of)
            logits = model(torch.tensor([padded], device=device))
            last = _full(logits[0, len(context) - 1])  # (vocab,)
            token = int(last[: tokenizer.vocab_size].argmax())
            if token == tokenizer.eos_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return tokenizer.decode(new)


def _full(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
