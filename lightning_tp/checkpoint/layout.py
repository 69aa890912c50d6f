"""Checkpoints on disk: the file names, completeness, ownership, and all-or-nothing writes.

A checkpoint saved by :class:`~lightning_tp.TensorParallelStrategy` is a directory holding a
``torch.distributed.checkpoint`` (DCP) save of ``{"state_dict", "optimizer_0", ...}`` (one
``__R_0.distcp`` shard file per rank plus :data:`DCP_METADATA`) and :data:`META_FILE`, the rest of
Lightning's checkpoint (loops, schedulers, callbacks, hyper-parameters, data position), written by
rank 0.

* **Complete** means: a directory with both ``.metadata`` and ``meta.pt`` (:func:`is_complete`,
  :func:`check_checkpoint`).
* **Staged publish**: the strategy writes a new checkpoint into the sibling ``<path>.tmp-<step>``
  (:func:`staging_path`), adds ``meta.pt`` once every rank's shards are on disk, and only then swaps
  it in (:func:`publish`: ``path`` → ``<path>.old``, ``<path>.tmp-<step>`` → ``path``,
  ``<path>.old`` removed). A crash at any point leaves the previous checkpoint at ``path`` (or, in
  the instant between the two renames, at ``<path>.old``, which :func:`recover` moves back), and
  never a partial directory under that name.
* **Ownership**: a save replaces, and cleanup deletes, only what :func:`written_by_strategy`
  recognises (:func:`refuse_to_replace` says why anything else is left alone).
* :func:`atomic_write` is the one way this package writes a file or a directory all or nothing
  (consolidated files, ``meta.pt``, Hugging Face exports, imported checkpoints, the token cache of
  :mod:`lightning_tp.data.corpus`).

Imports only torch and :mod:`lightning_tp.errors`, so that every other module may import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_tp.errors import CheckpointError

__all__ = [
    "DCP_METADATA",
    "LAYOUT_KEY",
    "META_FILE",
    "atomic_write",
    "backup_path",
    "check_checkpoint",
    "is_checkpoint_file_name",
    "is_complete",
    "publish",
    "recover",
    "refuse_to_replace",
    "remove",
    "staging_path",
    "write_checkpoint",
    "write_meta",
    "written_by_strategy",
]

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
DCP_METADATA = ".metadata"  # the file in which DCP records what each shard file holds
SHARD_SUFFIX = ".distcp"  # DCP's shard files: one per writing rank
LAYOUT_KEY = "lightning_tp"  # checkpoint entry the strategy adds: parameter order, mesh sizes


# ---------------------------------------------------------------------------------------- names


def staging_path(path: Path, step: int) -> Path:
    """Where a checkpoint for ``path`` is written before it is swapped in."""
    return path.with_name(f"{path.name}.tmp-{step}")


def backup_path(path: Path) -> Path:
    """Where the previous checkpoint sits during the swap."""
    return path.with_name(f"{path.name}.old")


def _temporary_sibling(path: Path, kind: str) -> Path:
    """A new hidden name beside ``path``: ``.<name>.<kind>-<pid>-<random>``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{os.urandom(4).hex()}")


def is_checkpoint_file_name(name: str) -> bool:
    """Whether a sharded save writes a file of this name: DCP's ``.metadata`` and ``*.distcp``
    shards, ``meta.pt``, and the temporary file :func:`write_meta` renames to ``meta.pt``."""
    return (name in (DCP_METADATA, META_FILE) or name.endswith(SHARD_SUFFIX)
            or name.startswith(f".{META_FILE}.tmp-"))


# ------------------------------------------------------------------------------------- completeness


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a complete sharded checkpoint directory (``.metadata``, ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a file or a complete checkpoint dir."""
    path = Path(path)
    if path.is_file():
        return
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the path does not exist. Fix: pass"
                              " the directory a run saved (e.g. out/pretrain/last), or check the"
                              " spelling.")
    if not path.is_dir():
        raise CheckpointError(f"The path {str(path)!r} does not point to a valid checkpoint: it is"
                              " neither a file nor a directory.")
    missing = [name for name in (DCP_METADATA, META_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"The path {str(path)!r} does not point to a valid checkpoint: the directory is"
            f" incomplete, it has no {' and no '.join(missing)}. It was not written completely (an"
            " interrupted save, or a directory that is not a checkpoint) and is refused. Resume"
            f" from a complete checkpoint: a directory with both {DCP_METADATA} and {META_FILE}."
        )


# ---------------------------------------------------------------------------------------- ownership


def _holds_only_checkpoint_files(directory: Path) -> bool:
    return all(entry.is_file() and not entry.is_symlink() and is_checkpoint_file_name(entry.name)
               for entry in directory.iterdir())


def _has_layout(file: Path) -> bool:
    """Whether ``file`` is a ``torch.save`` archive whose top-level dict has :data:`LAYOUT_KEY`.
    Memory-mapped and with ``weights_only=True``: cheap for a large file, and it runs no code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not an archive, or not one this strategy wrote
        return False
    return isinstance(state, Mapping) and LAYOUT_KEY in state


def written_by_strategy(path: str | Path, *, complete: bool = True) -> bool:
    """Whether ``path`` is what :class:`~lightning_tp.TensorParallelStrategy` writes, so that a save
    may replace it and cleanup may delete it: a single-file checkpoint with the strategy's layout
    entry, or a directory holding only sharded-checkpoint files whose ``meta.pt`` has it
    (``complete=False``: staging, ``meta.pt`` may be absent)."""
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
    """Why a save must not write to ``path`` (``None``: nothing is there, or a checkpoint the
    strategy wrote).

    A save replaces the whole of ``path`` (and uses ``staged`` and ``<path>.old`` beside it);
    anything else there (a user's file, a directory with other files, another strategy's checkpoint)
    would be lost, so it is refused and left untouched.
    """
    path = Path(path)
    for sibling in (Path(staged) if staged else None, backup_path(path)):
        if sibling is None or not (sibling.exists() or sibling.is_symlink()):
            continue
        if not written_by_strategy(sibling, complete=False):
            return (f"Refusing to save a checkpoint to {str(path)!r}: the save writes through"
                    f" {str(sibling)!r}, which exists and was not written by"
                    " TensorParallelStrategy; nothing was touched. Fix: move or rename it, or save"
                    " to another path.")
    if not (path.exists() or path.is_symlink()) or written_by_strategy(path):
        return None
    if path.is_symlink():
        what = "is a symbolic link"
    elif path.is_dir():
        foreign = sorted(e.name for e in path.iterdir() if not is_checkpoint_file_name(e.name))
        what = (f"is a directory holding files a checkpoint does not ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''})" if foreign else
                "is a directory that is not a complete checkpoint written by"
                " TensorParallelStrategy")
    else:
        what = "is a file that is not a checkpoint written by TensorParallelStrategy"
    return (f"Refusing to save a checkpoint to {str(path)!r}: it already exists and {what}. A save"
            " replaces the whole path, so it would be lost; nothing was touched. Fix: save to"
            " another path (e.g. another `dirpath` or `filename` for ModelCheckpoint), or move or"
            " delete it yourself if it is no longer needed.")


# --------------------------------------------------------------------------------- publish, recover


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames into it) to disk, where directories can be opened."""
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


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory below a directory, to disk."""
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for directory, _, files in os.walk(path):
        for name in files:
            _fsync_tree(Path(directory, name))
        _fsync_dir(Path(directory))


def remove(path: str | Path) -> None:
    """Delete a checkpoint file or directory; a directory loses ``meta.pt`` first, so that a crash
    in the middle of the deletion never leaves a directory that still looks complete."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        (path / META_FILE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(staged: Path, path: Path, backup: Path | None = None) -> None:
    """Swap the finished ``staged`` checkpoint (file or directory) in as ``path``.

    ``rename`` cannot replace a non-empty directory atomically, so the previous checkpoint is first
    renamed to ``backup`` (default ``<path>.old``) and removed only once the new one is in place: at
    every instant ``path`` is either the previous complete checkpoint, the new complete one, or
    absent with the previous one at ``<path>.old`` (see :func:`recover`).
    """
    old = backup_path(path) if backup is None else backup
    if old.exists():
        remove(old)
    replaced = path.exists() or path.is_symlink()
    if replaced:
        os.replace(path, old)
    os.replace(staged, path)
    _fsync_dir(path.parent)
    if replaced:
        remove(old)


def recover(path: str | Path) -> None:
    """Undo what a crash during a save left behind around ``path`` (rank 0 only; no-op when nothing
    is left).

    A crash between the two renames of :func:`publish` leaves no ``path`` but a complete
    ``<path>.old``: it is moved back. Leftover ``<path>.tmp-<step>`` directories are deleted, and so
    is ``<path>.old`` when ``path`` exists. Only what :func:`written_by_strategy` recognises is
    moved or deleted.
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
            step = stale.name.removeprefix(f"{path.name}.tmp-")
            if step.isdigit() and written_by_strategy(stale, complete=False):
                remove(stale)


# ---------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_write(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Write the file (or, with ``directory=True``, the directory) ``path`` all or nothing.

    Yields a new hidden path beside ``path`` (an empty directory with ``directory=True``) for the
    caller to write. When the block ends without an error, what was written there is flushed to disk
    (``fsync``) and replaces ``path``: a file with one ``os.replace``, a directory with
    :func:`publish` (the previous one moved aside under another hidden name, then removed); the
    parent directory is flushed too. On an error the temporary path is deleted and ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path, "tmp")
    try:
        if directory:
            temporary.mkdir()
        yield temporary
        _fsync_tree(temporary)
        if directory:
            publish(temporary, path, backup=_temporary_sibling(path, "old"))
        else:
            os.replace(temporary, path)
            _fsync_dir(path.parent)
    except BaseException:
        remove(temporary)
        raise


def write_meta(checkpoint: Mapping[str, Any], directory: Path) -> None:
    """``torch.save`` the non-tensor part of a checkpoint as ``directory/meta.pt``, atomically."""
    with atomic_write(Path(directory) / META_FILE) as file:
        torch.save(dict(checkpoint), file)


def write_checkpoint(shards: Mapping[str, Any], meta: Mapping[str, Any], path: str | Path) -> Path:
    """Write a sharded checkpoint directory ``path`` from this one process, without a process group:
    DCP's files for ``shards`` (e.g. ``{"state_dict": ...}``) and ``meta.pt`` holding ``meta``, all
    or nothing (:func:`atomic_write`)."""
    import torch.distributed.checkpoint as dcp

    with atomic_write(path, directory=True) as staged:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save(dict(shards), checkpoint_id=str(staged), no_dist=True)
        write_meta(meta, staged)
    return Path(path)
