"""The planner's ``checkpoint=`` input: a Hugging Face model directory (or its ``config.json``)
planned as the strategy would shard it.

The transformers model is built from the config on the meta device (no memory, never
``trust_remote_code``) and the strategy's own ``plan="auto"`` is resolved on it: a named family's
plan, or one derived from the model's ``base_model_tp_plan``
(:mod:`lightning_tp.parallel.families.derived`). Parameters, gradients and optimizer state are
counted from that model's real parameters under that plan. Activations, FLOPs and the decoder-layer
collectives use the planner's Llama-layer formulas on the fields of :class:`LlamaConfig` the config
maps to (hidden, MLP width, layers, heads, KV heads, head_dim, vocabulary, tied embeddings); a
Llama ``config.json`` maps through :func:`lightning_tp.checkpoint.hf_config.model_config`.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

from lightning_tp.checkpoint.hf_config import CONFIG_FILE, model_config, read_json
from lightning_tp.errors import CheckpointError
from lightning_tp.models.config import LlamaConfig
from lightning_tp.planner.errors import PlannerError

__all__ = ["CheckpointModel", "checkpoint_model", "config_file"]


def config_file(spec: str) -> Path:
    """``spec`` itself if it is a file, else ``spec/config.json``."""
    path = Path(spec).expanduser()
    return path / CONFIG_FILE if path.is_dir() else path


class CheckpointModel:
    """A checkpoint's model on the meta device, the :class:`LlamaConfig` its formulas use, and the
    plan source that ``plan="auto"`` picks for it."""

    def __init__(self, spec: str) -> None:
        path = config_file(spec)
        try:
            data = read_json(path)
        except CheckpointError as e:
            raise PlannerError(f"checkpoint={spec!r}: {e}") from None
        model_type = data.get("model_type")
        if not isinstance(model_type, str):
            raise PlannerError(f"checkpoint={spec!r}: {path} has no model_type, so it is not a"
                               " Hugging Face model config. Fix: pass the directory of a Hugging"
                               f" Face checkpoint or its {CONFIG_FILE}.")
        self.path, self.model_type = path, model_type
        self.model = _meta_model(data, spec)
        self.config = _llama_fields(self.model, data, path)
        self.num_params = sum(p.numel() for p in self.model.parameters())  # tied: counted once
        self.family = _family(self.model)


def _meta_model(data: dict[str, Any], spec: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in data.items() if k not in ("model_type", "auto_map")}
    try:
        config = AutoConfig.for_model(data["model_type"], **fields)
    except (ValueError, KeyError):
        raise PlannerError(f"checkpoint={spec!r}: model_type={data['model_type']!r} is not a"
                           " model type this transformers knows (models that need"
                           " trust_remote_code are never built). Fix: plan a checkpoint of a"
                           " transformers model type, or model=<preset>.") from None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as e:
        raise PlannerError(f"checkpoint={spec!r}: transformers cannot build a causal LM of"
                           f" model_type={data['model_type']!r} from it ({type(e).__name__}:"
                           f" {str(e)[:200]}). Fix: check its config.json.") from None


def _llama_fields(model: Any, data: dict[str, Any], path: Path) -> LlamaConfig:
    """The formulas' :class:`LlamaConfig`: Llama's own mapping for a Llama config.json, else the
    shape fields of the transformers config."""
    if data["model_type"] == "llama":
        try:
            return model_config(str(path))
        except CheckpointError:
            pass  # a Llama variant the native model does not cover: map its fields as below
    c = model.config.get_text_config()
    heads = getattr(c, "num_attention_heads", None)
    fields = dict(vocab_size=getattr(c, "vocab_size", None),
                  hidden_size=getattr(c, "hidden_size", None),
                  intermediate_size=getattr(c, "intermediate_size", None),
                  num_hidden_layers=getattr(c, "num_hidden_layers", None),
                  num_attention_heads=heads,
                  num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads)
    missing = [k for k, v in fields.items() if not isinstance(v, int)]
    if missing:
        raise PlannerError(f"checkpoint={str(path)!r}: its config has no integer {missing}, which"
                           " the planner's formulas need (model_type"
                           f" {data['model_type']!r}).")
    head_dim = getattr(c, "head_dim", None)
    try:
        return LlamaConfig(**fields, head_dim=head_dim if isinstance(head_dim, int) else None,
                           max_position_embeddings=getattr(c, "max_position_embeddings", 2048),
                           tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
    except (TypeError, ValueError) as e:
        raise PlannerError(f"checkpoint={str(path)!r}: {e}") from None


def _family(model: Any) -> str:
    """Which plan ``plan="auto"`` uses: a family's name, or the derivation and what it costs;
    :class:`PlanError` (a :class:`LightningTPError`) when neither fits."""
    from lightning_tp.parallel.families import family_of
    from lightning_tp.parallel.families.derived import derive_plan

    family = family_of(model)
    if family is not None:
        return f"family {family.name!r}" + (f" (extra per layer: {family.extras})"
                                            if family.extras else "")
    return derive_plan(model, sequence_parallel=True, loss_parallel=True).summary


@functools.lru_cache(maxsize=8)
def checkpoint_model(spec: str) -> CheckpointModel:
    """:class:`CheckpointModel` of ``spec`` (built once per path)."""
    return CheckpointModel(spec)
