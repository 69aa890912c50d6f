"""The Hugging Face checkpoint format: its file names, ``config.json`` ↔ :class:`LlamaConfig`, and
the model config a command line names.

Shared by :mod:`.hf` (reading Hugging Face checkpoints) and :mod:`.hf_export` (writing them).
Imports only :mod:`lightning_tp.models` and :mod:`lightning_tp.errors`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lightning_tp.errors import CheckpointError
from lightning_tp.models.config import LlamaConfig, get_config

__all__ = ["CONFIG_FILE", "INDEX_FILE", "NUMERIC_FIELDS", "SHAPE_FIELDS", "SINGLE_FILE",
           "TOKENIZER_FILES", "config_from_hf", "config_to_hf", "key_problems", "model_config",
           "read_json"]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"  # tensor name → shard file, for a sharded checkpoint
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")
# Compared by `load_hf_checkpoint` besides the shapes: they change the numbers without changing any
# shape.
NUMERIC_FIELDS = ("rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings")
_ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings")


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; :class:`CheckpointError` if absent, unreadable or no object."""
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(file)!r} does not exist. Fix: pass a Hugging Face model"
                              f" directory ({CONFIG_FILE} beside *.safetensors files).") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Could not read {str(file)!r} as JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(file)!r} must hold a JSON object, not {type(data).__name__}.")
    return data


def key_problems(needed: set[str], found: set[str], where: str) -> list[str]:
    """What is missing from and unexpected in ``where``, as sentences (none when the keys agree)."""
    return ([f"missing from {where}: {sorted(needed - found)}"] if needed - found else []) + (
        [f"unexpected in {where}: {sorted(found - needed)}"] if found - needed else [])


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """:class:`LlamaConfig` of a Llama 2/3/3.1/3.2 ``config.json`` (transformers 4 or 5 style)."""
    if d.get("model_type") != "llama":
        raise CheckpointError(f"config.json has model_type={d.get('model_type')!r}; only Llama"
                              " checkpoints (model_type 'llama': Llama 2, 3, 3.1, 3.2) are"
                              " supported. Fix: pass a Llama-family checkpoint directory.")
    if d.get("num_key_value_heads") is None and "num_attention_heads" in d:  # from before GQA
        d = {**d, "num_key_value_heads": d["num_attention_heads"]}
    missing = [f for f in SHAPE_FIELDS if f not in d]
    unsupported = [f"{k}={d[k]!r}" for k in ("attention_bias", "mlp_bias") if d.get(k)]
    if d.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={d['hidden_act']!r}")
    if missing or unsupported:
        raise CheckpointError(f"Unsupported Llama config.json: missing {missing}, unsupported"
                              f" {unsupported}.")
    # transformers 5 keeps rope_theta and the scaling in `rope_parameters`; 4 in `rope_theta` +
    # `rope_scaling`.
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    scaling = rope or d.get("rope_scaling") or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        elif kind == "llama3":
            scaling = {**{k: scaling[k] for k in _ROPE_KEYS if k in scaling}, "rope_type": "llama3"}
        else:
            raise CheckpointError(f"config.json has RoPE scaling type {kind!r}; only 'llama3'"
                                  " (Llama 3.1/3.2) and plain RoPE are supported.")
    names = {f.name for f in dataclasses.fields(LlamaConfig)} - {"rope_theta", "rope_scaling"}
    # Defaults of transformers' LlamaConfig for the optional fields (ours are those of the debug
    # preset).
    fields = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
    fields.update({k: v for k, v in d.items() if k in names and v is not None})
    try:
        return LlamaConfig(**fields, rope_theta=float(theta), rope_scaling=scaling)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json does not describe a valid Llama: {e}") from e


def config_to_hf(c: LlamaConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``c``; transformers 4 and 5 read its RoPE fields."""
    d: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    d.update({f: getattr(c, f) for f in SHAPE_FIELDS})
    if c.head_dim is not None:
        d["head_dim"] = c.head_dim
    d.update(max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
             initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
             hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
             pretraining_tp=1, use_cache=True, rope_theta=c.rope_theta,
             rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
             rope_parameters={"rope_type": "default", **(c.rope_scaling or {}),
                              "rope_theta": c.rope_theta})
    if dtype is not None:
        d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    return d


def model_config(spec: str) -> LlamaConfig:
    """The :class:`LlamaConfig` a command line names: a preset name, a Hugging Face ``config.json``
    (or the directory holding one), or a JSON file of :class:`LlamaConfig` fields."""
    path = Path(spec)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        return get_config(spec)
    data = read_json(path)
    return config_from_hf(data) if "model_type" in data else LlamaConfig(**data)
