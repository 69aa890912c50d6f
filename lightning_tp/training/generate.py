"""Text generation that works on a sharded model: every rank runs the same steps together.

Greedy (``temperature=0``) or seeded temperature + top-k sampling. No KV cache: each step re-runs
the whole (short) context. Meant for samples after training, not serving.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_tp.data.tokenizers import Tokenizer
from lightning_tp.parallel.dtensor import full

__all__ = ["check_sampling", "generate", "sample_token"]


def check_sampling(temperature: float, top_k: int | None) -> None:
    """Raise ``ValueError`` naming the fix for a negative temperature or a top-k below 1."""
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or temperature < 0):
        raise ValueError(f"temperature={temperature!r} must be a number >= 0"
                         " (0 = greedy; e.g. 0.8)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive int or None (no limit; 1 = greedy;"
                         " e.g. 40)")


def sample_token(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> int:
    """One token id from a ``(vocab,)`` logits vector.

    ``temperature == 0`` (or ``top_k == 1``) is the argmax. Otherwise the ``top_k`` largest logits
    (all of them when ``top_k`` is None) are divided by ``temperature`` and one is drawn from their
    softmax with ``generator`` (a CPU generator: the same seed gives the same draws on every device
    and every rank).
    """
    check_sampling(temperature, top_k)
    logits = logits.detach().float().flatten()
    if temperature == 0 or top_k == 1:
        return int(logits.argmax())
    if top_k is not None and top_k < logits.numel():
        values, indices = torch.topk(logits, top_k)
    else:
        values, indices = logits, None
    probs = torch.softmax(values.cpu().double() / temperature, dim=-1)
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return choice if indices is None else int(indices[choice])


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48,
             pad_to_multiple_of: int = 1, max_context: int | None = None, *,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> str:
    """Continue ``prompt``; returns only the new text.

    ``temperature=0`` is greedy; above 0 each token is drawn from the ``top_k`` most likely ones
    (see :func:`sample_token`) with a generator seeded with ``seed``, so the same seed gives the
    same text. BOS and PAD (when it is not EOS) are never produced; EOS ends the text.

    Under tensor parallelism call it on every rank (the forward passes are collective); with a
    process group initialised, rank 0's choice of each token is broadcast so that every rank
    continues the same context. Inputs are padded on the right to a multiple of
    ``pad_to_multiple_of`` (the TP degree under sequence parallelism); with a causal model, padding
    after the last real token does not change its logits.
    """
    check_sampling(temperature, top_k)
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt, bos=True)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(seed))
    never = [i for i in (tokenizer.bos_id, tokenizer.pad_id)
             if i is not None and i != tokenizer.eos_id]
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            context = ids[-max_context:] if max_context else ids
            padded = context + [tokenizer.pad_id] * (-len(context) % pad_to_multiple_of)
            logits = model(torch.tensor([padded], device=device))
            # (vocab,)
            last = full(logits[0, len(context) - 1])[: tokenizer.vocab_size].float().clone()
            last[never] = float("-inf")
            token = _same_on_every_rank(sample_token(last, temperature, top_k, generator),
                                        last.device)
            if token == tokenizer.eos_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return tokenizer.decode(new)


def _same_on_every_rank(token: int, device: torch.device) -> int:
    """Rank 0's token on every rank: logits can differ in the last bit between data-parallel
    replicas, and a different draw would give the ranks different contexts."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return token
    # nccl needs a CUDA tensor
    on = device if "nccl" in str(dist.get_backend()) else torch.device("cpu")
    t = torch.tensor([token], dtype=torch.long, device=on)
    dist.broadcast(t, src=0)
    return int(t.item())
