"""Sampling for the post-training text sample: seeded, greedy at temperature 0 and top_k=1, top-k support."""

from __future__ import annotations

import pytest
import torch

from lightning_tp.data.tokenizers import ByteTokenizer
from lightning_tp.models import Llama, LlamaConfig
from lightning_tp.training.generate import generate, sample_token


def _logits(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(logits: torch.Tensor, n: int, seed: int, **kwargs) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [sample_token(logits, generator=g, **kwargs) for _ in range(n)]


def test_temperature_zero_is_the_argmax() -> None:
    for seed in range(5):
        logits = _logits(seed)
        assert sample_token(logits, temperature=0.0) == int(logits.argmax())
        assert sample_token(logits, temperature=0.0, top_k=5) == int(logits.argmax())


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = _logits(1)
    assert set(_draws(logits, 50, seed=0, temperature=5.0, top_k=1)) == {int(logits.argmax())}


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    logits = _logits(2)
    a = _draws(logits, 64, seed=7, temperature=1.0, top_k=20)
    assert a == _draws(logits, 64, seed=7, temperature=1.0, top_k=20)
    assert a != _draws(logits, 64, seed=8, temperature=1.0, top_k=20)


def test_top_k_restricts_the_support_to_the_k_largest() -> None:
    logits = _logits(3)
    top = set(torch.topk(logits, 4).indices.tolist())
    draws = _draws(logits, 400, seed=0, temperature=10.0, top_k=4)  # a hot temperature: near-uniform over the 4
    assert set(draws) == top
    everything = _draws(logits, 400, seed=0, temperature=10.0, top_k=None)
    assert len(set(everything)) > 4


def test_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    draws = torch.tensor(_draws(logits, 6000, seed=0, temperature=1.0))
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits.double(), 0), atol=0.02)


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"temperature": 1.0, "top_k": 0},
                                    {"temperature": 1.0, "top_k": 2.5}])
def test_bad_sampling_arguments_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="temperature|top_k"):
        sample_token(_logits(), **kwargs)


def _model() -> Llama:
    model = Llama(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.init_weights(seed=0)
    return model


def test_generate_is_reproducible_and_greedy_at_temperature_zero() -> None:
    model, tok = _model(), ByteTokenizer()
    greedy = generate(model, tok, "def ", 12)
    assert generate(model, tok, "def ", 12, temperature=0.0, top_k=40, seed=3) == greedy
    assert generate(model, tok, "def ", 12, temperature=1.0, top_k=1) == greedy
    sampled = generate(model, tok, "def ", 12, temperature=1.0, top_k=40, seed=5)
    assert sampled == generate(model, tok, "def ", 12, temperature=1.0, top_k=40, seed=5)
    assert {generate(model, tok, "def ", 12, temperature=1.0, top_k=40, seed=s) for s in range(4)} != {sampled}
    assert model.training  # restored


class _Fixed(torch.nn.Module):
    """Logits ``favourite`` at every position, whatever the input."""

    def __init__(self, favourite: torch.Tensor) -> None:
        super().__init__()
        self.favourite = torch.nn.Parameter(favourite)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.favourite.expand(*input_ids.shape, -1)


class _Recording(ByteTokenizer):
    def decode(self, ids: list[int]) -> str:
        self.ids = list(ids)
        return super().decode(ids)


def test_generate_never_emits_bos_or_pad() -> None:
    tok = _Recording()
    logits = torch.zeros(tok.vocab_size)
    logits[[tok.bos_id, tok.pad_id]] = 50.0  # by far the most likely tokens
    logits[ord("a")] = 5.0
    assert generate(_Fixed(logits), tok, "x", 8) == "a" * 8
    generate(_Fixed(logits), tok, "x", 8, temperature=1.0, top_k=3, seed=0)
    assert len(tok.ids) == 8 and not {tok.bos_id, tok.pad_id} & set(tok.ids)


def test_generate_stops_at_eos() -> None:
    tok = ByteTokenizer()
    logits = torch.zeros(tok.vocab_size)
    logits[tok.eos_id] = 50.0
    assert generate(_Fixed(logits), tok, "x", 8, temperature=0.8, top_k=40) == ""
