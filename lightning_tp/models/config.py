"""Llama configuration and the registry of named presets.

Field names follow Hugging Face transformers' ``LlamaConfig`` so that a ``config.json`` maps onto
:class:`LlamaConfig` key for key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["LlamaConfig", "PRESETS", "get_config", "list_presets"]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama 2/3-family decoder."""

    vocab_size: int = 512
    """Number of token ids; the embedding and ``lm_head`` have this many rows."""
    hidden_size: int = 64
    """Model width ``h``."""
    intermediate_size: int = 192
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 2
    """Number of decoder blocks ``L``."""
    num_attention_heads: int = 8
    """Query heads."""
    num_key_value_heads: int = 4
    """Key/value heads; fewer than query heads means grouped-query attention."""
    head_dim: int | None = None
    """Per-head width; ``None`` means ``hidden_size // num_attention_heads``."""
    max_position_embeddings: int = 256
    """Longest sequence the RoPE tables are meant for (informational; tables are computed per
    call)."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """Llama 3.1 frequency scaling: ``{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}``; ``None`` for plain RoPE."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with ``lm_head``."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"`{name}` must be a positive int, got {value!r}")
        if not problems and self.num_attention_heads % self.num_key_value_heads != 0:
            problems.append(
                f"`num_attention_heads`={self.num_attention_heads} must be a multiple of"
                f" `num_key_value_heads`={self.num_key_value_heads} for grouped-query attention"
            )
        if (not problems and self.head_dim is None
                and self.hidden_size % self.num_attention_heads != 0):
            problems.append(
                f"`hidden_size`={self.hidden_size} is not divisible by `num_attention_heads`="
                f"{self.num_attention_heads}; set `head_dim` explicitly or change one of them"
            )
        if not problems and self.resolved_head_dim % 2 != 0:
            problems.append(f"head dim {self.resolved_head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings"}
            missing -= set(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "llama3"))
            if kind != "llama3":
                problems.append(f"`rope_scaling.rope_type`={kind!r} is not supported;"
                                " only 'llama3' is")
            elif missing:
                problems.append(f"`rope_scaling` lacks {sorted(missing)}")
        if problems:
            raise ValueError("Invalid LlamaConfig: " + "; ".join(problems) + ".")

    @property
    def resolved_head_dim(self) -> int:
        return (self.head_dim if self.head_dim is not None
                else self.hidden_size // self.num_attention_heads)

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed, validated like a new config."""
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count, computed from the shapes (no model needed)."""
        h, d = self.hidden_size, self.resolved_head_dim
        attn = h * d * self.num_attention_heads * 2 + h * d * self.num_key_value_heads * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + head + self.num_hidden_layers * per_layer + h

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6·(N − N_embedding) for the matmuls plus 12·L·h·s for
        attention."""
        non_embedding = self.num_params - self.vocab_size * self.hidden_size
        attention = (12 * self.num_hidden_layers * self.num_attention_heads * self.resolved_head_dim
                     * seq_len)
        return 6 * non_embedding + attention


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA32_SCALING = {**_LLAMA31_SCALING, "factor": 32.0}
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               rope_scaling=_LLAMA31_SCALING)

PRESETS: dict[str, LlamaConfig] = {
    # Tiny, for tests: every dimension divides tp in {1, 2, 4}, kv heads < heads (GQA).
    "debug": LlamaConfig(),
    # Small enough to train on two CPU cores in minutes, large enough to learn text.
    "small": LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024),
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096),
    "llama3_1b": LlamaConfig(**{**_LLAMA3, "rope_scaling": _LLAMA32_SCALING}, hidden_size=2048,
                             intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3_3b": LlamaConfig(**{**_LLAMA3, "rope_scaling": _LLAMA32_SCALING}, hidden_size=3072,
                             intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                             num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "llama3_8b": LlamaConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama3_70b": LlamaConfig(**_LLAMA3, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "llama3_405b": LlamaConfig(**_LLAMA3, hidden_size=16384, intermediate_size=53248,
                               num_hidden_layers=126, num_attention_heads=128,
                               num_key_value_heads=8),
    # SmolLM2-135M: 9 query / 3 KV heads, which tp 2, 4 and 8 do not divide (replicated attention
    # projections, lightning_tp.parallel.heads).
    "smollm2_135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                rope_theta=100000.0, tie_word_embeddings=True),
}


def list_presets() -> list[str]:
    """Names accepted by :func:`get_config`."""
    return list(PRESETS)


def get_config(name: str, **overrides: Any) -> LlamaConfig:
    """The preset called exactly ``name``, optionally with some fields overridden."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"Unknown Llama preset {name!r}. Valid names: {', '.join(PRESETS)}.{hint}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config

