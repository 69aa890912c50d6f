"""Export a checkpoint of a transformers model trained through the strategy (any family of the
auto plan: Gemma, Phi-3, OLMo-2, Granite, Mixtral, ...) in that family's own format.

The strategy records each transformers model's ``config.to_dict()`` in the checkpoint
(``meta.pt``, entry ``lightning_tp/transformers``). :func:`export_transformers` rebuilds the model
from it on the meta device (``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``, no
remote code), fills it with the consolidated weights (checked: every key, every shape) and writes it
with transformers' own ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained`` loads it as
that family. The native ``Llama``'s checkpoints go through :func:`.hf_export.export_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from lightning_tp.checkpoint.hf_config import TOKENIZER_FILES
from lightning_tp.checkpoint.hf_export import consolidated_state_dict
from lightning_tp.checkpoint.layout import LAYOUT_KEY, META_FILE, atomic_write
from lightning_tp.checkpoint.safe_reading import read_meta
from lightning_tp.errors import CheckpointError

__all__ = ["FamilyExport", "export_transformers", "model_layout", "transformers_models"]


@dataclasses.dataclass(frozen=True)
class FamilyExport:
    """What :func:`export_transformers` wrote."""

    model_type: str
    num_params: int
    files: list[Path]
    tokenizer: str | None


def model_layout(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (full tensors as the parallelized ``model`` keeps them) in the model's own layout:
    a style of the auto plan may keep a weight in another shape or row order (``model_layout``
    of the fused projections of :mod:`lightning_tp.parallel.fused`, the experts of
    :mod:`lightning_tp.parallel.experts`); its rule does not depend on tp."""
    from lightning_tp.parallel.lora import is_lora_layer
    from lightning_tp.parallel.plans import resolve_plan

    plan = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
    out = dict(state)
    for path, style in plan.styles.items():
        if not hasattr(style, "model_layout"):
            continue
        target = model.get_submodule(path)
        # a PEFT LoRA layer: its base, and each lora_B (split as the base, by output rows)
        owners = ([f"{path}.base_layer", *(f"{path}.lora_B.{a}" for a in target.lora_B)]
                  if is_lora_layer(target) else [path])
        for owner in owners:
            for name, _ in model.get_submodule(owner).named_parameters(recurse=False):
                if f"{owner}.{name}" in out:
                    out[f"{owner}.{name}"] = style.model_layout(name, out[f"{owner}.{name}"])
    return out


def stored_in_plan_layout(checkpoint: str | Path) -> bool:
    """Whether the weights of ``checkpoint`` are in the plan's layout (the run had tp > 1): at tp 1
    the plan is not applied and every weight keeps the model's own shape and row order."""
    path = Path(checkpoint)
    if not (path / META_FILE).is_file():
        return True
    layout = read_meta(path, weights_only=True).get(LAYOUT_KEY) or {}
    return int(layout.get("tensor_parallel_size") or 2) > 1


def transformers_models(checkpoint: str | Path) -> dict[str, dict[str, Any]]:
    """``{module path: config dict}`` of the transformers models a checkpoint directory holds
    (``{}`` for a native Llama's, a checkpoint without ``meta.pt``, or one whose ``meta.pt`` cannot
    be read with ``weights_only``)."""
    path = Path(checkpoint)
    if not (path / META_FILE).is_file():
        return {}
    try:
        layout = read_meta(path, weights_only=True).get(LAYOUT_KEY) or {}
    except Exception:  # noqa: BLE001 - not readable safely: the native export path says why
        return {}
    return dict(layout.get("transformers") or {})


def export_transformers(checkpoint: str | Path, out_dir: str | Path, *, root: str | None = None,
                        tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
                        overwrite: bool = False) -> FamilyExport:
    """Write the transformers model at ``root`` (the only one if None) of the sharded checkpoint
    ``checkpoint`` as a Hugging Face directory ``out_dir``, with the tokenizer files of
    ``tokenizer`` if given. An existing non-empty ``out_dir`` is refused unless ``overwrite``."""
    import transformers

    checkpoint, out = Path(checkpoint), Path(out_dir)
    models = transformers_models(checkpoint)
    if root is None and len(models) == 1:
        root = next(iter(models))
    if root not in models:
        raise CheckpointError(f"{str(checkpoint)!r} holds transformers models at {sorted(models)}"
                              f" (root={root!r}). Fix: pass one of them as the root.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"Cannot export to {str(out)!r}: it exists and is not empty. Fix:"
                              " choose another directory, or pass overwrite=True (--overwrite).")
    config_dict = dict(models[root])
    model_type = config_dict.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    state = consolidated_state_dict(checkpoint, prefix=f"{root}." if root else "")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if stored_in_plan_layout(checkpoint):
        state = model_layout(model, state)
    tied = [k for k in expected if k not in state and getattr(config, "tie_word_embeddings", False)]
    problems = [f"{k}: missing" for k in expected if k not in state and k not in tied]
    problems += [f"{k}: unexpected" for k in state if k not in expected]
    problems += [f"{k}: {tuple(v.shape)} in the checkpoint, {expected[k]} in the model"
                 for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    if problems:
        raise CheckpointError(f"The weights in {str(checkpoint)!r} do not fit"
                              f" {type(model).__name__} from its recorded config:"
                              f" {'; '.join(problems[:8])}.")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    files = [Path(tokenizer) / f for f in TOKENIZER_FILES
             if tokenizer and (Path(tokenizer) / f).is_file()]
    with atomic_write(out, directory=True) as staged:
        model.save_pretrained(staged)
        for f in files:
            shutil.copyfile(f, staged / f.name)
    return FamilyExport(model_type, sum(p.numel() for p in model.parameters()),
                        sorted(out.iterdir()), str(tokenizer) if files else None)
