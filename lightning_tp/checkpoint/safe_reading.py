"""Reading checkpoints without running code from them; the one reader without a process group.

* ``meta.pt`` and single files: ``torch.load(weights_only=True)`` (:func:`read_meta`).
* DCP's ``.metadata`` file (a pickle): :class:`SafeFileSystemReader`, whose unpickler builds only
  DCP's own metadata classes, torch sizes and dtypes, and paths (:func:`read_checkpoint_metadata`
  also checks that every shard file is there and long enough).
* DCP byte entries (non-tensor values such as optimizer param groups): :class:`SafeLoadPlanner`
  unpickles them with ``weights_only=True``; DCP's default planner would use plain pickle.
* :func:`load_full` is the one way this package reads a DCP checkpoint in a single process without a
  process group (consolidation, Hugging Face export).

``weights_only=False`` (the caller's explicit choice, for trusted checkpoints only) reads with plain
pickle. Imports only torch, :mod:`lightning_tp._compat`, :mod:`lightning_tp.errors` and
:mod:`.layout`.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# Bound under DCP's own name so that the source audit of safe loading
# (tests/unit/test_reliability.py) recognises each call as a DCP load and checks its reader and
# planner.
from lightning_tp._compat import (
    EmptyStateDictLoadPlanner,
    load_state_dict_no_process_group,
    set_element,
)
from lightning_tp.checkpoint.layout import DCP_METADATA, META_FILE, check_checkpoint
from lightning_tp.errors import CheckpointError

__all__ = [
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "load_full",
    "read_checkpoint_metadata",
    "read_failure",
    "read_meta",
    "unpickling_hint",
]


def _allowed_global(module: str, name: str, obj: Any) -> bool:
    if module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type):
        return dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
    if module == "torch":
        return obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout,
                                                     torch.memory_format))
    if (module, name) == ("torch.serialization", "_get_layout"):
        return True
    if module == "pathlib":
        return isinstance(obj, type) and issubclass(obj, pathlib.PurePath)
    return (module, name) in {("collections", "OrderedDict"), ("builtins", "set"),
                              ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata dataclasses, torch sizes/dtypes and paths; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if not _allowed_global(module, name, obj):
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name} from a checkpoint's {DCP_METADATA} file: only"
                " DCP metadata is allowed."
            )
        return obj


class SafeFileSystemReader(FileSystemReader):
    """A DCP ``FileSystemReader`` that reads ``.metadata`` with an allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _safe_load_bytes(planner: DefaultLoadPlanner, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes``, unpickling with ``weights_only=True``."""
    obj = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """A DCP load planner that unpickles byte entries with ``weights_only=True``."""

    load_bytes = _safe_load_bytes


class _SafeEmptyStateDictLoadPlanner(EmptyStateDictLoadPlanner):
    """Rebuilds the saved state dict without a model; reads byte entries safely."""

    load_bytes = _safe_load_bytes


def read_meta(directory: str | Path, weights_only: bool = True) -> Any:
    """The ``meta.pt`` of a sharded checkpoint directory, on the CPU; ``weights_only=False``
    (trusted checkpoints only) unpickles objects that safe loading refuses."""
    return torch.load(Path(directory) / META_FILE, map_location="cpu", weights_only=weights_only)


def read_checkpoint_metadata(path: str | Path, *, complete: bool = True) -> Metadata:
    """The DCP ``.metadata`` of the sharded checkpoint directory ``path``, read safely, after
    checking that the directory is complete (:func:`~.layout.check_checkpoint`; ``complete=False``:
    only its DCP part is needed, ``meta.pt`` may be absent) and that every shard file it refers to
    exists and is long enough. Reads no tensor data: cheap enough for the launching process.

    Raises:
        CheckpointError: the directory is missing or incomplete, ``.metadata`` is unreadable, or a
        shard
            file is missing or truncated (named).
    """
    path = Path(path)
    if complete:
        check_checkpoint(path)
    elif not (path / DCP_METADATA).is_file():
        raise CheckpointError(f"{str(path)!r} is not a sharded checkpoint directory (no"
                              f" {DCP_METADATA} file). Point it at a directory written by a"
                              " TensorParallelStrategy run, e.g. out/pretrain/last.")
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    except Exception as e:
        reason = str(e).rstrip(".")
        raise CheckpointError("Unreadable checkpoint metadata: could not read"
                              f" {str(path / DCP_METADATA)!r}: {type(e).__name__}: {reason}. Fix:"
                              " point at a complete checkpoint directory written by this project"
                              " (e.g. out/pretrain/last).") from e
    needed: dict[str, int] = {}  # shard file -> bytes the metadata says it holds
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"shard file {str(file)!r} is missing")
        elif file.stat().st_size < size:
            problems.append(f"shard file {str(file)!r} has {file.stat().st_size} bytes but the"
                            f" metadata needs {size}")
    if problems:
        raise CheckpointError(f"The checkpoint {str(path)!r} is damaged: {'; '.join(problems)}. It"
                              " was truncated or copied incompletely. Fix: copy it again from where"
                              " it was saved, or use another complete checkpoint.")
    return metadata


def load_full(checkpoint_dir: str | Path, weights_only: bool = True,
              keys: Collection[str] | None = None) -> dict[str, Any]:
    """The entries of a sharded checkpoint's DCP part as full tensors (and plain values), read in
    this process without a process group: ``{"state_dict": {...}, "optimizer_0": {...}, ...}``.

    ``keys`` reads only those entries, named as in the checkpoint's ``.metadata`` (flattened, e.g.
    ``"state_dict.model.embed_tokens.weight"``). Needs memory for everything it reads; tensors keep
    the checkpoint's dtype. ``weights_only=False`` (trusted checkpoints only) reads ``.metadata``
    and byte entries with plain pickle. Raises DCP's errors (``CheckpointException`` is a
    ``BaseException``).
    """
    state: dict[str, Any] = {}
    if weights_only:
        load_state_dict_no_process_group(state,
                                         storage_reader=SafeFileSystemReader(str(checkpoint_dir)),
                                         planner=_SafeEmptyStateDictLoadPlanner(keys=keys),
                                         no_dist=True)
    else:
        load_state_dict_no_process_group(state,
                                         storage_reader=FileSystemReader(str(checkpoint_dir)),
                                         planner=EmptyStateDictLoadPlanner(keys=keys),
                                         no_dist=True)
    return state


def read_failure(what: str, error: BaseException, weights_only: bool) -> CheckpointError:
    """The :class:`CheckpointError` for a checkpoint that could not be read: ``what`` (e.g.
    ``"Could not load the checkpoint '...'"``), the error, and, when safe loading refused it, how to
    opt out."""
    hint = unpickling_hint(error) if weights_only else ""
    return CheckpointError(f"{what}: {type(error).__name__}: {error}{hint}")


def unpickling_hint(error: BaseException) -> str:
    """Advice for a checkpoint that ``weights_only=True`` refused (e.g. OmegaConf objects)."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error).lower():
        return (" The checkpoint holds objects that safe (weights_only) loading refuses. If you"
                " trust its source, load it with weights_only=False (Trainer.fit(...,"
                " weights_only=False); consolidate --trust-pickle).")
    return ""
