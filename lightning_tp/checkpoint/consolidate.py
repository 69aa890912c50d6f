"""Consolidation: a sharded checkpoint directory → ONE file in Lightning's full-checkpoint format.

:func:`consolidate` writes what ``ModelParallelStrategy(save_distributed_checkpoint=False)`` writes,
in a single process without a process group; ``lightning-tp consolidate DIR OUT`` (:func:`main`) is
its command-line form. The directory is checked and read through :mod:`.safe_reading`, the file
written with :func:`.layout.atomic_write`.

The names of :mod:`.layout` and :mod:`.safe_reading` that earlier releases defined here stay
importable from this module.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException

from lightning_tp.checkpoint.layout import (
    LAYOUT_KEY,
    META_FILE,
    atomic_write,
    check_checkpoint,
    is_complete,
    publish,
    recover,
    remove,
)
from lightning_tp.checkpoint.safe_reading import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    load_full,
    read_checkpoint_metadata,
    read_failure,
    read_meta,
)
from lightning_tp.errors import CheckpointError

__all__ = [
    # defined here
    "consolidate",
    "main",
    "rekey_to_param_ids",
    # kept importable from here (defined in .layout and .safe_reading)
    "META_FILE",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "check_checkpoint",
    "is_complete",
    "publish",
    "read_checkpoint_metadata",
    "recover",
    "remove",
]


def rekey_to_param_ids(optimizer_state: Mapping[str, Any],
                       parameter_names: list[str] | None) -> dict[str, Any]:
    """An optimizer state keyed by parameter names → keyed by position in ``model.parameters()``.

    The result is what ``FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, model)``
    returns, the format ``ModelParallelStrategy(save_distributed_checkpoint=False)`` writes. Without
    the parameter order (a checkpoint not written by this package), the names are kept: Lightning's
    loader accepts those as they are.
    """
    state, groups = optimizer_state["state"], optimizer_state["param_groups"]
    names = {name for group in groups for name in group["params"]} | set(state)
    if parameter_names is None or not names <= set(parameter_names):
        warnings.warn("The checkpoint does not record the model's parameter order; the consolidated"
                      " optimizer state stays keyed by parameter names (which Lightning also"
                      " loads).",
                      stacklevel=2)
        return {"state": dict(state), "param_groups": [dict(group) for group in groups]}
    index = {name: i for i, name in enumerate(parameter_names)}
    return {
        "state": {index[name]: value for name, value in state.items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in groups],
    }


def consolidate(checkpoint_dir: str | Path, out_file: str | Path,
                weights_only: bool = True) -> Path:
    """Write the sharded checkpoint ``checkpoint_dir`` as ONE file ``out_file`` in Lightning's
    checkpoint format.

    The file holds everything ``meta.pt`` holds (epoch, global_step, loops, lr_schedulers,
    callbacks, hyper_parameters, the data module's position, ...) plus ``"state_dict"`` (full
    tensors, keyed as the LightningModule's ``state_dict``) and ``"optimizer_states"`` (one full
    optimizer state per optimizer, keyed by parameter id as
    ``ModelParallelStrategy(save_distributed_checkpoint=False)`` writes it). It loads with
    ``torch.load(..., weights_only=True)``, into a plain model (``state_dict`` minus the
    LightningModule's attribute prefix), and resumes a run:
    ``Trainer(strategy=TensorParallelStrategy(...)).fit(..., ckpt_path=out_file)``, with any (dp,
    tp). Runs in one process, without a process group; needs memory for the full model and
    optimizer. ``weights_only=False`` reads ``meta.pt`` and DCP's metadata with plain pickle: only
    for trusted checkpoints whose hyper-parameters hold objects ``torch.load(weights_only=True)``
    refuses.

    Raises:
        CheckpointError: ``checkpoint_dir`` is not a complete sharded checkpoint or cannot be read,
        or
            ``out_file`` is a directory.
    """
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if checkpoint_dir.is_file():
        raise CheckpointError(f"consolidate: {str(checkpoint_dir)!r} is a single file already, not"
                              " a sharded checkpoint directory. Fix: use the file as it is, or pass"
                              " the directory it came from.")
    if weights_only:  # complete, and a missing or truncated shard is named before reading
        read_checkpoint_metadata(checkpoint_dir)
    else:
        check_checkpoint(checkpoint_dir)
    if out_file.resolve() == checkpoint_dir.resolve() or out_file.is_dir():
        raise CheckpointError(f"consolidate: the output {str(out_file)!r} must be a file path, not"
                              " a directory. Fix: pass a file name, e.g."
                              f" {str(out_file / 'last.ckpt')!r}.")
    try:
        meta = read_meta(checkpoint_dir, weights_only=weights_only)
        shards = load_full(checkpoint_dir, weights_only=weights_only)
    except (Exception, CheckpointException) as e:
        raise read_failure(f"consolidate: could not read {str(checkpoint_dir)!r}", e,
                           weights_only) from e
    layout = meta.get(LAYOUT_KEY) or {}
    parameter_names = layout.get("parameter_names")
    optimizer_keys = sorted((k for k in shards if k.startswith("optimizer_")),
                            key=lambda k: int(k.split("_")[1]))
    checkpoint = {
        **meta,
        "state_dict": shards.get("state_dict", {}),
        "optimizer_states": [rekey_to_param_ids(shards[k], parameter_names)
                             for k in optimizer_keys],
        LAYOUT_KEY: {**layout, "consolidated_from": str(checkpoint_dir)},
    }
    with atomic_write(out_file) as staged:
        torch.save(checkpoint, staged)
    return out_file


def main(argv: list[str] | None = None) -> None:
    """``lightning-tp consolidate CHECKPOINT_DIR OUT_FILE``."""
    summary = " ".join(consolidate.__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="lightning-tp consolidate", description=summary)
    parser.add_argument("checkpoint_dir", help="sharded checkpoint directory, e.g."
                                               " out/pretrain/last")
    parser.add_argument("out_file", help="the single checkpoint file to write, e.g."
                                         " out/pretrain/last.ckpt")
    parser.add_argument("--trust-pickle", action="store_true",
                        help=f"read {META_FILE} and DCP metadata with plain pickle (trusted"
                             " checkpoints only)")
    args = parser.parse_args(argv)
    try:
        path = consolidate(args.checkpoint_dir, args.out_file, weights_only=not args.trust_pickle)
    except CheckpointError as e:
        raise SystemExit(f"lightning-tp consolidate: {e}") from e
    print(f"[lightning-tp] consolidated {args.checkpoint_dir} -> {path}"
          f" ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
