"""A Llama 2/3-family decoder in plain PyTorch.

This file knows nothing about parallelism. Tensor parallelism shards the projections from the
outside (see :mod:`lightning_tp.parallel.plans`); the reshapes here use ``-1`` for the head count so
that a rank holding ``n_heads / tp`` heads computes the right shapes without any attribute being
edited. Module names match Hugging Face transformers' ``LlamaForCausalLM``, so one plan and one
checkpoint layout serve both.

Build on the meta device, then call :meth:`Llama.init_weights` once the parameters have storage::

    with torch.device("meta"):
        model = Llama(get_config("llama3_8b"))
    ...  # shard it
    model.to_empty(device="cuda")
    model.init_weights()
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tp import _compat
from lightning_tp.models.config import LlamaConfig

__all__ = ["Llama", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "RMSNorm",
           "rope_inv_freq"]


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm normalising in fp32 whatever the activation dtype, as the reference implementation
    does, but keeping for backward only the input (in its own dtype) and one fp32 scale per token.
    Autograd through the fp32 ops would keep an fp32 copy of the input and the normalised output
    too: 3x the bytes in bf16."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for 16-bit and fp32 inputs
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            reduce = tuple(range(grad.ndim - 1))
            grad_weight = (grad * normed.to(x.dtype)).sum(reduce).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # d/dx of x·rstd(x): rstd · (g − x̂ · mean(g · x̂)), with g the gradient reaching the
            # normalised value
            g = (grad * weight).to(rstd.dtype)
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse RoPE frequencies, shape ``(head_dim // 2,)``, with Llama 3.1 scaling if
    configured."""
    dim = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta
                      ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept; in between,
    # interpolate smoothly in 1/wavelength.
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled).float()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (bs, seqlen, n_heads, head_dim) by tables (seqlen, head_dim)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return x * cos + _rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.resolved_head_dim
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        x = hidden_states
        bs, seqlen, _ = x.shape
        # -1 infers the local head count: n_heads / tp on a tensor-parallel rank.
        # (bs, seqlen, n_local_heads, head_dim)
        q = self.q_proj(x).view(bs, seqlen, -1, self.head_dim)
        # (bs, seqlen, n_local_kv_heads, head_dim)
        k = self.k_proj(x).view(bs, seqlen, -1, self.head_dim)
        v = self.v_proj(x).view(bs, seqlen, -1, self.head_dim)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (bs, n_local_heads, seqlen, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=q.shape[1] != k.shape[1])
        out = out.transpose(1, 2).reshape(bs, seqlen, -1)  # (bs, seqlen, n_local_heads * head_dim)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        # Keyword arguments, as in Hugging Face's decoder layer, so one plan prepares both models'
        # inputs.
        h = x + self.self_attn(hidden_states=self.input_layernorm(x),
                               position_embeddings=position_embeddings)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A plain (never sharded) tensor, recomputed by init_weights after `to_empty`.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        seqlen = input_ids.shape[1]
        h = self.embed_tokens(input_ids)  # (bs, seqlen, dim); (bs, seqlen / tp, dim) under SP
        positions = torch.arange(seqlen, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (seqlen, head_dim)
        position_embeddings = (emb.cos().to(h.dtype), emb.sin().to(h.dtype))
        for layer in self.layers:
            h = layer(h, position_embeddings=position_embeddings)  # one positional input, as in HF
        return self.norm(h)


class Llama(nn.Module):
    """Causal language model: token ids (bs, seqlen) → logits (bs, seqlen, vocab_size)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.model(input_ids))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter and buffer in place; works on sharded (DTensor) parameters.

        Linear and embedding weights ~ N(0, initializer_range²), norms = 1, RoPE tables recomputed.

        With ``seed``, each weight draws from its own generator, seeded from ``seed`` and the
        weight's qualified name (``model.layers.0.self_attn.q_proj.weight``), so no draw depends
        on which weights were drawn before it or on how a sharded draw advances a generator. A
        sharded (DTensor) weight draws its full global tensor on its shard's device and keeps the
        slice this rank owns: the values are those of the unsharded model built on the same device
        type with the same seed, whatever the mesh and placements (``Shard`` on any dim, uneven,
        ``Replicate``, several mesh dims). The price: peak extra memory of one full parameter
        (the largest: Llama 3 8B's embedding, 128256 × 4096 fp32, is 1.96 GiB) on every rank, and
        every rank draws every full tensor. Without ``seed`` the global generator draws, through
        DTensor's RNG tracker for DTensors.
        """
        if (self.config.tie_word_embeddings
                and self.lm_head.weight is not self.model.embed_tokens.weight):
            # `to_empty()` gives every module a new Parameter, which unties shared weights.
            self.lm_head.weight = self.model.embed_tokens.weight
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue  # the embedding, drawn once under its own name
                if seed is None:
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                else:
                    _seeded_normal_(module.weight, _parameter_seed(seed, f"{name}.weight"), std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.model.inv_freq.copy_(rope_inv_freq(self.config, device=self.model.inv_freq.device))


def _parameter_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for the parameter ``name`` under ``seed``: the same in every process
    and Python run (SHA-256, where ``hash()`` of a string is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seeded_normal_(param: Tensor, seed: int, std: float) -> None:
    """Fill ``param`` with its part of one N(0, std²) draw of its full (global) shape from a
    generator seeded with ``seed`` on the device that holds it. A sharded parameter (a DTensor,
    known by its ``device_mesh``: this file imports nothing of parallelism) keeps the
    slice of the draw that its placements give this rank."""
    mesh = getattr(param, "device_mesh", None)
    local = param if mesh is None else param.to_local()
    if local.numel() == 0:  # an empty shard (uneven sharding) or a rank outside the mesh
        return
    generator = torch.Generator(device=local.device).manual_seed(seed)
    full = torch.empty(param.shape, dtype=local.dtype, device=local.device)
    full.normal_(mean=0.0, std=std, generator=generator)
    if mesh is not None:
        shape, offset = _compat.compute_local_shape_and_global_offset(param.shape, mesh,
                                                                      param.placements)
        full = full[tuple(slice(start, start + size)
                          for start, size in zip(offset, shape, strict=True))]
    local.copy_(full)
