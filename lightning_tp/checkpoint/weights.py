"""Loading model weights (not training state) into a sharded model: from this project's sharded
checkpoints (read through :mod:`.safe_reading`) or from Hugging Face directories (:mod:`.hf`).

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
from lightning_tp.checkpoint.layout import META_FILE, check_checkpoint
from lightning_tp.checkpoint.safe_reading import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_checkpoint_metadata,
    read_meta,
)
from lightning_tp.errors import CheckpointError

__all__ = ["LoadWeights", "check_weights_fit", "is_hf_checkpoint", "load_weights"]


def is_hf_checkpoint(path: str | Path) -> bool:
    """A Hugging Face model directory: ``config.json`` beside safetensors weights."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any(path.glob("*.safetensors"))


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load model weights into ``module`` from this project's sharded checkpoint or a Hugging Face
    directory.

    A sharded (distributed) checkpoint may have been saved with another (dp, tp); a Hugging Face
    directory is loaded into the Llama found inside ``module``. Either way each rank reads only the
    slices its own shards need. Collective for sharded checkpoints: call it on every rank.
    """
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

    roots = find_llama(module)
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
    if is_hf_checkpoint(path):
        check_hf_checkpoint(module, path, prefix=_llama_root(module, path))
        return
    path = Path(path)
    _refuse_single_file(path)
    metadata = read_checkpoint_metadata(path)  # also: complete, every shard file there
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
