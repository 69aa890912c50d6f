"""Loading model weights (not training state) from this project's checkpoints into a sharded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from lightning_tp.errors import LightningTPError

__all__ = ["CheckpointError", "LoadWeights", "is_hf_checkpoint", "load_weights"]


class CheckpointError(LightningTPError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


def is_hf_checkpoint(path: str | Path) -> bool:
    """A Hugging Face model directory: ``config.json`` beside safetensors weights."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load model weights into ``module`` from this project's sharded checkpoint or a Hugging Face directory.

    A sharded (distributed) checkpoint may have been saved with another (dp, tp); a Hugging Face directory
    is loaded into the Llama found inside ``module``. Either way each rank reads only the slices its own
    shards need. Collective for sharded checkpoints: call it on every rank.
    """
    if is_hf_checkpoint(path):
        from lightning_tp.hf import load_hf_checkpoint
        from lightning_tp.parallel.plans import find_llama

        roots = find_llama(module)
        if len(roots) != 1:
            raise CheckpointError(f"Loading the Hugging Face checkpoint {str(path)!r} needs exactly one Llama-family"
                                  f" model in {type(module).__name__}; found {len(roots)}.")
        load_hf_checkpoint(module, path, prefix=roots[0])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from lightning_tp.consolidate import SafeFileSystemReader, check_checkpoint

    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"checkpoint={str(path)!r} is a single file; this loader reads sharded checkpoint"
                              " directories, e.g. out/pretrain/last.")
    check_checkpoint(path)
    state = get_model_state_dict(module)
    try:
        # The reader unpickles only torch's own checkpoint-metadata types from .metadata.
        dcp.load({"state_dict": state}, storage_reader=SafeFileSystemReader(str(path)))
    except Exception as e:  # DCP reports missing keys and shape mismatches; say which checkpoint and why
        raise CheckpointError(f"Could not load the weights in {str(path)!r} into {type(module).__name__}: {e}") from e
    set_model_state_dict(module, state)


class LoadWeights(L.Callback):
    """Load model weights from a checkpoint once the strategy has sharded the model, before any step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        load_weights(pl_module, self.path)
