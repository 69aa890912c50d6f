"""Loading model weights (not training state) into a sharded model: from this project's sharded
checkpoints (read through :mod:`.safe_reading`) or from Hugging Face directories (:mod:`.hf`).

A model with PEFT LoRA adapters takes its base weights from either kind of checkpoint: its tensors
are named as without adapters (:func:`base_weights`: ``base_model.model.`` and ``.base_layer``
dropped) and the adapters are left as they are. A checkpoint holding adapters only (the training
checkpoint of a LoRA run) has no base weights and is refused (:func:`check_weights_fit`).

Imports :mod:`.layout`, :mod:`.safe_reading`, :mod:`.hf` and :mod:`.hf_config`, and
:mod:`lightning_tp.parallel.plans` when a Hugging Face directory is loaded (to find the Llama).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from lightning_tp.checkpoint.hf import check_hf_checkpoint, load_hf_checkpoint
from lightning_tp.checkpoint.hf_config import CONFIG_FILE
from lightning_tp.checkpoint.layout import LAYOUT_KEY, META_FILE, check_checkpoint
from lightning_tp.checkpoint.safe_reading import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_checkpoint_metadata,
    read_meta,
)
from lightning_tp.errors import CheckpointError

__all__ = ["LoadWeights", "base_weights", "check_weights_fit", "is_hf_checkpoint", "load_weights",
           "saved_layout"]


def is_hf_checkpoint(path: str | Path) -> bool:
    """A Hugging Face model directory: ``config.json`` beside safetensors weights."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any(path.glob("*.safetensors"))


class LoraBase(nn.Module):
    """The base weights of a model with LoRA adapters, named as the model without them: the same
    tensor objects (plain, DTensor or meta), registered under those names, nothing copied.
    ``llama_roots`` are the paths of its Llama-family models (each with its ``config``)."""

    llama_roots: list[str]


def _is_peft_model(module: nn.Module) -> bool:
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft.")
               for c in type(module).__mro__)


def base_weights(module: nn.Module) -> LoraBase | None:
    """For a ``module`` holding PEFT LoRA layers, its base weights (:class:`LoraBase`); ``None``
    without LoRA layers.

    A PEFT model at ``P`` holds its model at ``P.base_model.model``, and a LoRA layer at ``L`` holds
    the original projection at ``L.base_layer`` beside the adapters ``L.lora_A``/``L.lora_B``; the
    view drops both steps and the adapters, so a checkpoint of the plain model fills it."""
    from lightning_tp.parallel.lora import lora_layers
    from lightning_tp.parallel.plans import find_llama

    layers = lora_layers(module)
    if not layers:
        return None
    wrappers = [path for path, m in module.named_modules() if _is_peft_model(m)]

    def renamed(path: str) -> str:
        for wrapper in wrappers:
            inner = f"{wrapper}.base_model.model" if wrapper else "base_model.model"
            if path == inner or path.startswith(inner + "."):
                return wrapper + path[len(inner):] if wrapper else path[len(inner) + 1:]
        return path

    view = LoraBase()
    for name, tensor in module.state_dict(keep_vars=True).items():
        layer = next((p for p in layers if name.startswith(p + ".")), None)
        if layer is not None:
            rest = name[len(layer) + 1:]
            if not rest.startswith("base_layer."):
                continue  # an adapter (lora_A, lora_B, ...): not in a base checkpoint
            name = f"{layer}.{rest[len('base_layer.'):]}"
        owner_path, _, leaf = renamed(name).rpartition(".")
        owner: nn.Module = view
        for part in owner_path.split(".") if owner_path else ():
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(leaf, tensor)
        else:
            owner.register_buffer(leaf, tensor)
    view.llama_roots = []
    for root in find_llama(module):  # the Hugging Face checks compare each model's config
        target = renamed(root)
        view.get_submodule(target).config = getattr(module.get_submodule(root), "config", None)
        view.llama_roots.append(target)
    return view


def saved_layout(path: str | Path) -> dict[str, Any]:
    """What a sharded checkpoint's ``meta.pt`` records about the run that saved it (mesh sizes,
    ``adapters_only``, ``peft`` configs); ``{}`` for a Hugging Face directory or a checkpoint that
    records nothing."""
    path = Path(path)
    if is_hf_checkpoint(path) or not (path / META_FILE).is_file():
        return {}
    try:
        meta = read_meta(path, weights_only=True)
    except Exception:
        return {}
    layout = meta.get(LAYOUT_KEY) if isinstance(meta, dict) else None
    return layout if isinstance(layout, dict) else {}


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load model weights into ``module`` from this project's sharded checkpoint or a Hugging Face
    directory.

    A sharded (distributed) checkpoint may have been saved with another (dp, tp); a Hugging Face
    directory is loaded into the Llama found inside ``module``. Either way each rank reads only the
    slices its own shards need. Collective for sharded checkpoints: call it on every rank. With
    LoRA adapters in ``module`` the checkpoint fills the base (:func:`base_weights`) and the
    adapters keep their values.
    """
    base = base_weights(module)
    if base is not None:
        load_weights(base, path)
        return
    if is_hf_checkpoint(path):
        load_hf_checkpoint(module, path, prefix=_llama_root(module, path))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    path = Path(path)
    _refuse_single_file(path)
    check_checkpoint(path)
    state = get_model_state_dict(module)
    try:
        # The reader unpickles only torch's own checkpoint-metadata types from .metadata, and the
        # planner reads any non-tensor entry with weights_only=True: a crafted directory cannot run
        # code.
        dcp.load({"state_dict": state}, storage_reader=SafeFileSystemReader(str(path)),
                 planner=SafeLoadPlanner())
    # DCP reports missing keys, shape mismatches and refused pickles, the latter as
    # CheckpointException, which derives from BaseException; say which checkpoint and why
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"Could not load the weights in {str(path)!r} into"
                              f" {type(module).__name__}: {e}") from e
    set_model_state_dict(module, state)


def _llama_root(module: nn.Module, path: str | Path) -> str:
    """The path of the one Llama-family model in ``module`` (a Hugging Face checkpoint fills it)."""
    from lightning_tp.parallel.plans import find_llama

    # a LoraBase's modules are plain containers; it knows where its Llama is
    roots = module.llama_roots if isinstance(module, LoraBase) else find_llama(module)
    if len(roots) != 1:
        raise CheckpointError(f"Loading the Hugging Face checkpoint {str(path)!r} needs exactly one"
                              f" Llama-family model in {type(module).__name__}; found"
                              f" {len(roots)}.")
    return roots[0]


def _refuse_single_file(path: Path) -> None:
    if path.is_file():
        raise CheckpointError(f"checkpoint={str(path)!r} is a single file; this loader reads"
                              " sharded checkpoint directories. Fix: pass the directory a run"
                              " saved, e.g. out/pretrain/last.")


def _trained_model(path: Path) -> Any:
    """The ``model`` hyper-parameter saved in a checkpoint's ``meta.pt`` (a preset name or config
    fields), if any."""
    try:
        meta = read_meta(path, weights_only=True)
    except Exception:
        return None
    return (meta.get("hyper_parameters") or {}).get("model") if isinstance(meta, dict) else None


def check_weights_fit(module: nn.Module, path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint at ``path`` can fill every tensor of
    ``module``.

    Reads only metadata (DCP ``.metadata`` and ``meta.pt``, or safetensors headers), so the
    launching process can run it on a meta-device module before any rank starts: a checkpoint of
    another model (missing keys), of another shape, or with a missing or truncated shard file fails
    here instead of inside every rank.
    """
    base = base_weights(module)
    if base is not None:
        check_weights_fit(base, path)
        return
    if is_hf_checkpoint(path):
        check_hf_checkpoint(module, path, prefix=_llama_root(module, path))
        return
    path = Path(path)
    _refuse_single_file(path)
    metadata = read_checkpoint_metadata(path)  # also: complete, every shard file there
    layout = saved_layout(path)
    if layout.get("adapters_only"):
        bases = sorted({str(c.get("base_model_name_or_path")) for adapters in
                        (layout.get("peft") or {}).values() for c in adapters.values()})
        raise CheckpointError(
            f"checkpoint={str(path)!r} holds LoRA adapters only (its {META_FILE} says"
            " adapters_only), no base weights to start from. Fix: start from the checkpoint the"
            f" adapters were trained on (checkpoint={', '.join(bases) or '...'}) and continue"
            f" these adapters with resume={str(path)!r}, or export them merged (lightning-tp"
            " export --merged) and start from that directory.")
    saved = {k.removeprefix("state_dict."): tuple(v.size)
             for k, v in metadata.state_dict_metadata.items()
             if k.startswith("state_dict.") and hasattr(v, "size")}
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(wanted) - set(saved))
    shapes = [f"{k}: model {wanted[k]} vs checkpoint {saved[k]}" for k in sorted(wanted)
              if k in saved and wanted[k] != saved[k]]
    if not (missing or shapes):
        return
    problems = []
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        problems.append(f"{len(missing)} of the model's {len(wanted)} tensors are not in it"
                        f" ({missing[:4]}{more}; it holds e.g. {sorted(saved)[:2]})")
    if shapes:
        problems.append(f"{len(shapes)} tensors differ in shape ({'; '.join(shapes[:4])})")
    trained = _trained_model(path)
    fix = (f"build the model it was trained with (its {META_FILE} says model={trained!r}; e.g. the"
           " matching model=... preset and model.* overrides)" if trained is not None
           else "build the model it was trained with")
    raise CheckpointError(f"The checkpoint {str(path)!r} does not fit {type(module).__name__}: "
                          + "; ".join(problems) + f". Fix: {fix}, or start from a checkpoint of"
                          " this model.")


class LoadWeights(L.Callback):
    """Load model weights from a checkpoint once the strategy has sharded the model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        load_weights(pl_module, self.path)
