"""Sharded checkpoints on disk: completeness, crash-safe publishing, safe reading, and consolidation into one file.

A checkpoint saved by :class:`~lightning_tp.TensorParallelStrategy` is a directory holding a
``torch.distributed.checkpoint`` (DCP) save of ``{"state_dict", "optimizer_0", ...}`` (one ``__R_0.distcp`` shard
file per rank plus ``.metadata``) and ``meta.pt``, the rest of Lightning's checkpoint (loops, schedulers, callbacks,
hyper-parameters, data position), written by rank 0.

* **Complete** means: a directory with both ``.metadata`` and ``meta.pt``. The strategy writes a new checkpoint into
  the sibling ``<path>.tmp-<step>``, adds ``meta.pt`` once every rank's shards are on disk, and only then swaps it
  in (``path`` → ``<path>.old``, ``<path>.tmp-<step>`` → ``path``, ``<path>.old`` removed). A crash at any point
  leaves the previous checkpoint at ``path`` (or, in the instant between the two renames, at ``<path>.old``, which
  :func:`recover` moves back), and never a partial directory under that name.
* **Safe reading**: ``meta.pt`` is read with ``torch.load(weights_only=True)``; the DCP ``.metadata`` file (a
  pickle) with an unpickler that only builds DCP's own metadata classes; DCP byte entries (optimizer param groups)
  with ``weights_only=True``.
* :func:`consolidate` turns a directory into ONE file in Lightning's full-checkpoint format (what
  ``ModelParallelStrategy(save_distributed_checkpoint=False)`` writes), in a single process without a process
  group. ``lightning-tp consolidate DIR OUT`` is the command-line form.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import io
import os
import pathlib
import pickle
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from lightning_tp.errors import CheckpointError

__all__ = [
    "META_FILE",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "check_checkpoint",
    "consolidate",
    "is_complete",
    "main",
    "publish",
    "read_checkpoint_metadata",
    "recover",
    "remove",
]

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
DCP_METADATA = ".metadata"
LAYOUT_KEY = "lightning_tp"  # checkpoint entry the strategy adds: parameter order, mesh sizes


# ---------------------------------------------------------------------------------------------------- on disk


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a complete sharded checkpoint directory (``.metadata`` and ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


def staging_path(path: Path, step: int) -> Path:
    """Where a checkpoint for ``path`` is written before it is swapped in."""
    return path.with_name(f"{path.name}.tmp-{step}")


def backup_path(path: Path) -> Path:
    """Where the previous checkpoint sits during the swap."""
    return path.with_name(f"{path.name}.old")


def _is_checkpoint_file_name(name: str) -> bool:
    """A name a sharded save writes: DCP's ``.metadata`` and ``*.distcp`` shards, and ``meta.pt``."""
    return name in (DCP_METADATA, META_FILE) or name.endswith(".distcp")


def _holds_only_checkpoint_files(directory: Path) -> bool:
    return all(entry.is_file() and not entry.is_symlink() and _is_checkpoint_file_name(entry.name)
               for entry in directory.iterdir())


def _has_layout(file: Path) -> bool:
    """Whether ``file`` is a ``torch.save`` archive whose top-level dict has the strategy's :data:`LAYOUT_KEY`.
    Memory-mapped and with ``weights_only=True``: cheap for a large file, and it runs no code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not an archive, or not one this strategy wrote
        return False
    return isinstance(state, Mapping) and LAYOUT_KEY in state


def written_by_strategy(path: str | Path, *, complete: bool = True) -> bool:
    """Whether ``path`` is what :class:`~lightning_tp.TensorParallelStrategy` writes, so that a save may replace it
    and cleanup may delete it: a single-file checkpoint with the strategy's layout entry, or a directory holding
    only sharded-checkpoint files whose ``meta.pt`` has it (``complete=False``: staging, ``meta.pt`` may be absent)."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_file():
        return _has_layout(path)
    if not path.is_dir() or not _holds_only_checkpoint_files(path):
        return False
    if (path / META_FILE).is_file():
        return _has_layout(path / META_FILE) and (not complete or (path / DCP_METADATA).is_file())
    return not complete


def refuse_to_replace(path: str | Path, staged: str | Path | None = None) -> str | None:
    """Why a save must not write to ``path`` (``None``: nothing is there, or a checkpoint the strategy wrote).

    A save replaces the whole of ``path`` (and uses ``staged`` and ``<path>.old`` beside it); anything else there
    (a user's file, a directory with other files, another strategy's checkpoint) would be lost, so it is refused
    and left untouched.
    """
    path = Path(path)
    for sibling in (p for p in (Path(staged) if staged else None, backup_path(path)) if p is not None):
        if (sibling.exists() or sibling.is_symlink()) and not written_by_strategy(sibling, complete=False):
            return (f"Refusing to save a checkpoint to {str(path)!r}: the save writes through {str(sibling)!r}, which"
                    " exists and was not written by TensorParallelStrategy; nothing was touched. Fix: move or rename"
                    " it, or save to another path.")
    if not (path.exists() or path.is_symlink()) or written_by_strategy(path):
        return None
    if path.is_symlink():
        what = "is a symbolic link"
    elif path.is_dir():
        foreign = sorted(e.name for e in path.iterdir() if not _is_checkpoint_file_name(e.name))
        what = (f"is a directory holding files a checkpoint does not ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''})" if foreign else
                "is a directory that is not a complete checkpoint written by TensorParallelStrategy")
    else:
        what = "is a file that is not a checkpoint written by TensorParallelStrategy"
    return (f"Refusing to save a checkpoint to {str(path)!r}: it already exists and {what}. A save replaces the"
            " whole path, so it would be lost; nothing was touched. Fix: save to another path (e.g. another"
            " `dirpath` or `filename` for ModelCheckpoint), or move or delete it yourself if it is no longer needed.")


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete checkpoint directory or a single file."""
    path = Path(path)
    if path.is_file():
        return
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the path does not exist. Fix: pass the directory a run"
                              " saved (e.g. out/pretrain/last), or check the spelling.")
    if not path.is_dir():
        raise CheckpointError(f"The path {str(path)!r} does not point to a valid checkpoint: it is neither a file nor"
                              " a directory.")
    missing = [name for name in (DCP_METADATA, META_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"The path {str(path)!r} does not point to a valid checkpoint: the directory is incomplete, it has no"
            f" {' and no '.join(missing)}. It was not"
            " written completely (an interrupted save, or a directory that is not a checkpoint) and is refused."
            " Resume from a complete checkpoint: a directory with both .metadata and meta.pt."
        )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path: str | Path) -> None:
    """Delete a checkpoint file or directory; a directory loses ``meta.pt`` first, so that a crash in the middle
    of the deletion never leaves a directory that still looks complete."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        (path / META_FILE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def recover(path: str | Path) -> None:
    """Undo what a crash during a save left behind around ``path`` (rank 0 only; no-op when nothing is left).

    A crash between the two renames of :func:`publish` leaves no ``path`` but a complete ``<path>.old``: it is
    moved back. Leftover ``<path>.tmp-<step>`` directories are deleted, and so is ``<path>.old`` when ``path``
    exists. Only what :func:`written_by_strategy` recognises is moved or deleted.
    """
    path = Path(path)
    old = backup_path(path)
    if written_by_strategy(old):  # an absent or foreign <path>.old is never touched
        if not (path.exists() or path.is_symlink()):
            os.replace(old, path)
            _fsync_dir(path.parent)
        elif written_by_strategy(path):
            remove(old)
    if path.parent.is_dir():
        for stale in path.parent.glob(f"{path.name}.tmp-*"):
            if stale.name.removeprefix(f"{path.name}.tmp-").isdigit() and written_by_strategy(stale, complete=False):
                remove(stale)


def write_meta(checkpoint: Mapping[str, Any], directory: Path) -> None:
    """``torch.save`` the non-tensor part of a checkpoint as ``directory/meta.pt``, flushed to disk."""
    with open(directory / META_FILE, "wb") as f:
        torch.save(dict(checkpoint), f)
        f.flush()
        os.fsync(f.fileno())


def publish(staged: Path, path: Path) -> None:
    """Swap the finished ``staged`` checkpoint (file or directory) in as ``path``.

    ``rename`` cannot replace a non-empty directory atomically, so the previous checkpoint is first renamed to
    ``<path>.old`` and removed only once the new one is in place: at every instant ``path`` is either the previous
    complete checkpoint, the new complete one, or absent with the previous one at ``<path>.old`` (see
    :func:`recover`).
    """
    old = backup_path(path)
    if old.exists():
        remove(old)
    replaced = path.exists() or path.is_symlink()
    if replaced:
        os.replace(path, old)
    os.replace(staged, path)
    _fsync_dir(path.parent)
    if replaced:
        remove(old)


# ---------------------------------------------------------------------------------------------------- safe reading


def _allowed_global(module: str, name: str, obj: Any) -> bool:
    if module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type):
        return dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
    if module == "torch":
        return obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
    if (module, name) == ("torch.serialization", "_get_layout"):
        return True
    if module == "pathlib":
        return isinstance(obj, type) and issubclass(obj, pathlib.PurePath)
    return (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata dataclasses, torch sizes/dtypes and paths; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if not _allowed_global(module, name, obj):
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name} from a checkpoint's .metadata file: only DCP metadata is allowed."
            )
        return obj


class SafeFileSystemReader(FileSystemReader):
    """A DCP ``FileSystemReader`` that reads ``.metadata`` with an allow-list unpickler instead of ``pickle``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_checkpoint_metadata(path: str | Path) -> Metadata:
    """The DCP ``.metadata`` of the sharded checkpoint directory ``path``, read safely, after checking that the
    directory is complete (:func:`check_checkpoint`) and that every shard file it refers to exists and is long
    enough. Reads no tensor data: cheap enough for the launching process.

    Raises:
        CheckpointError: the directory is missing or incomplete, ``.metadata`` is unreadable, or a shard file is
            missing or truncated (named).
    """
    path = Path(path)
    check_checkpoint(path)
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    except Exception as e:
        reason = str(e).rstrip(".")
        raise CheckpointError(f"Unreadable checkpoint metadata: could not read {str(path / DCP_METADATA)!r}:"
                              f" {type(e).__name__}: {reason}. Fix: point at a complete checkpoint directory written"
                              " by this project (e.g. out/pretrain/last).") from e
    needed: dict[str, int] = {}  # shard file -> bytes the metadata says it holds
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"shard file {str(file)!r} is missing")
        elif file.stat().st_size < size:
            problems.append(f"shard file {str(file)!r} has {file.stat().st_size} bytes but the metadata needs {size}")
    if problems:
        raise CheckpointError(f"The checkpoint {str(path)!r} is damaged: " + "; ".join(problems) + ". It was"
                              " truncated or copied incompletely. Fix: copy it again from where it was saved, or"
                              " use another complete checkpoint.")
    return metadata


def _safe_load_bytes(planner: DefaultLoadPlanner, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True`` (byte entries are e.g. optimizer param groups)."""
    obj = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """A DCP load planner that unpickles byte entries with ``weights_only=True``."""

    load_bytes = _safe_load_bytes


class _SafeEmptyStateDictLoadPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the whole saved state dict without a model (for :func:`consolidate`), byte entries read safely."""

    load_bytes = _safe_load_bytes


# ---------------------------------------------------------------------------------------------------- consolidation


def load_full(checkpoint_dir: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """Every entry of a sharded checkpoint's DCP part as full tensors, in this process (no process group)."""
    state: dict[str, Any] = {}
    if weights_only:
        reader, planner = SafeFileSystemReader(str(checkpoint_dir)), _SafeEmptyStateDictLoadPlanner()
    else:
        reader, planner = FileSystemReader(str(checkpoint_dir)), _EmptyStateDictLoadPlanner()
    _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    return state


def unpickling_hint(error: BaseException) -> str:
    """Advice for a checkpoint that ``weights_only=True`` loading refused (e.g. OmegaConf hyper-parameters)."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error).lower():
        return (" The checkpoint holds objects that safe (weights_only) loading refuses. If you trust its source, load"
                " it with weights_only=False (Trainer.fit(..., weights_only=False); consolidate --trust-pickle).")
    return ""


def rekey_to_param_ids(optimizer_state: Mapping[str, Any], parameter_names: list[str] | None) -> dict[str, Any]:
    """An optimizer state keyed by parameter names → keyed by position in ``model.parameters()``.

    The result is what ``FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, model)`` returns, the
    format ``ModelParallelStrategy(save_distributed_checkpoint=False)`` writes. Without the parameter order (a
    checkpoint not written by this package), the names are kept: Lightning's loader accepts those as they are.
    """
    state, groups = optimizer_state["state"], optimizer_state["param_groups"]
    names = {name for group in groups for name in group["params"]} | set(state)
    if parameter_names is None or not names <= set(parameter_names):
        warnings.warn("The checkpoint does not record the model's parameter order; the consolidated optimizer state"
                      " stays keyed by parameter names (which Lightning also loads).", stacklevel=2)
        return {"state": dict(state), "param_groups": [dict(group) for group in groups]}
    index = {name: i for i, name in enumerate(parameter_names)}
    return {
        "state": {index[name]: value for name, value in state.items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in groups],
    }


def consolidate(checkpoint_dir: str | Path, out_file: str | Path, weights_only: bool = True) -> Path:
    """Write the sharded checkpoint ``checkpoint_dir`` as ONE file ``out_file`` in Lightning's checkpoint format.

    The file holds everything ``meta.pt`` holds (epoch, global_step, loops, lr_schedulers, callbacks,
    hyper_parameters, the data module's position, ...) plus ``"state_dict"`` (full tensors, keyed as the
    LightningModule's ``state_dict``) and ``"optimizer_states"`` (one full optimizer state per optimizer, keyed by
    parameter id as ``ModelParallelStrategy(save_distributed_checkpoint=False)`` writes it). It loads with
    ``torch.load(..., weights_only=True)``, into a plain model (``state_dict`` minus the LightningModule's attribute
    prefix), and resumes a run: ``Trainer(strategy=TensorParallelStrategy(...)).fit(..., ckpt_path=out_file)``,
    with any (dp, tp). Runs in one process, without a process group; needs memory for the full model and optimizer.
    ``weights_only=False`` reads ``meta.pt`` and DCP's metadata with plain pickle: only for trusted checkpoints whose
    hyper-parameters hold objects ``torch.load(weights_only=True)`` refuses.

    Raises:
        CheckpointError: ``checkpoint_dir`` is not a complete sharded checkpoint or cannot be read, or ``out_file``
            is a directory.
    """
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if checkpoint_dir.is_file():
        raise CheckpointError(f"consolidate: {str(checkpoint_dir)!r} is a single file already, not a sharded"
                              " checkpoint directory. Fix: use the file as it is, or pass the directory it came from.")
    if weights_only:
        read_checkpoint_metadata(checkpoint_dir)  # complete, and a missing or truncated shard is named before reading
    else:
        check_checkpoint(checkpoint_dir)
    if out_file.resolve() == checkpoint_dir.resolve() or out_file.is_dir():
        raise CheckpointError(f"consolidate: the output {str(out_file)!r} must be a file path, not a directory."
                              f" Fix: pass a file name, e.g. {str(out_file / 'last.ckpt')!r}.")
    try:
        meta = torch.load(checkpoint_dir / META_FILE, map_location="cpu", weights_only=weights_only)
        shards = load_full(checkpoint_dir, weights_only=weights_only)
    except (Exception, CheckpointException) as e:
        hint = unpickling_hint(e) if weights_only else ""
        message = f"consolidate: could not read {str(checkpoint_dir)!r}: {type(e).__name__}: {e}{hint}"
        raise CheckpointError(message) from e
    layout = meta.get(LAYOUT_KEY) or {}
    parameter_names = layout.get("parameter_names")
    optimizer_keys = sorted((k for k in shards if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint = {
        **meta,
        "state_dict": shards.get("state_dict", {}),
        "optimizer_states": [rekey_to_param_ids(shards[k], parameter_names) for k in optimizer_keys],
        LAYOUT_KEY: {**layout, "consolidated_from": str(checkpoint_dir)},
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staged = out_file.with_name(f"{out_file.name}.tmp")
    with open(staged, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, out_file)
    return out_file


def main(argv: list[str] | None = None) -> None:
    """``lightning-tp consolidate CHECKPOINT_DIR OUT_FILE``."""
    parser = argparse.ArgumentParser(prog="lightning-tp consolidate", description=consolidate.__doc__.split("\n")[0])
    parser.add_argument("checkpoint_dir", help="sharded checkpoint directory, e.g. out/pretrain/last")
    parser.add_argument("out_file", help="the single checkpoint file to write, e.g. out/pretrain/last.ckpt")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read meta.pt and DCP metadata with plain pickle (trusted checkpoints only)")
    args = parser.parse_args(argv)
    try:
        path = consolidate(args.checkpoint_dir, args.out_file, weights_only=not args.trust_pickle)
    except CheckpointError as e:
        raise SystemExit(f"lightning-tp consolidate: {e}") from e
    print(f"[lightning-tp] consolidated {args.checkpoint_dir} -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
