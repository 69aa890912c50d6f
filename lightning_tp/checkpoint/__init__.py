"""Checkpoints: everything lightning-tp reads from or writes to disk for a model's state.

* :mod:`.layout`: the file names of a sharded checkpoint, completeness, what the strategy wrote,
  staged publishing and crash recovery, and :func:`~.layout.atomic_write`, the one all-or-nothing
  writer of the package.
* :mod:`.safe_reading`: reading without running code from the checkpoint (allow-list unpickler for
  DCP metadata, ``weights_only`` for byte entries and ``meta.pt``), and
  :func:`~.safe_reading.load_full`, the one reader that needs no process group.
* :mod:`.weights`: loading model weights (not training state) into a sharded model, for fine-tuning.
* :mod:`.consolidate`: a sharded checkpoint → one file in Lightning's format
  (``lightning-tp consolidate``).
* :mod:`.hf` (with :mod:`.hf_config` and :mod:`.hf_export`): Hugging Face ``config.json`` and
  safetensors in and out (``lightning-tp import`` / ``export``).

The strategy's save, load and remove overrides
(:class:`lightning_tp.strategy.checkpoint_io.AtomicCheckpointMixin`) are built on :mod:`.layout` and
:mod:`.safe_reading`. The submodules import one another directly, never this package, so that no
import cycle runs through it.
"""

from lightning_tp.checkpoint.consolidate import consolidate, rekey_to_param_ids
from lightning_tp.checkpoint.hf import (
    check_hf_checkpoint,
    config_from_hf,
    config_to_hf,
    consolidated_state_dict,
    export_checkpoint,
    export_hf,
    import_hf,
    llama_from_hf,
    load_hf_checkpoint,
)
from lightning_tp.checkpoint.layout import META_FILE, check_checkpoint, is_complete
from lightning_tp.checkpoint.safe_reading import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    load_full,
    read_checkpoint_metadata,
)
from lightning_tp.checkpoint.weights import (
    LoadWeights,
    check_weights_fit,
    is_hf_checkpoint,
    load_weights,
)

__all__ = [
    "META_FILE",
    "LoadWeights",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "check_checkpoint",
    "check_hf_checkpoint",
    "check_weights_fit",
    "config_from_hf",
    "config_to_hf",
    "consolidate",
    "consolidated_state_dict",
    "export_checkpoint",
    "export_hf",
    "import_hf",
    "is_complete",
    "is_hf_checkpoint",
    "llama_from_hf",
    "load_full",
    "load_hf_checkpoint",
    "load_weights",
    "read_checkpoint_metadata",
    "rekey_to_param_ids",
]
