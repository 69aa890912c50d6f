"""Pretraining corpora: file discovery, the embedded default corpus, and the on-disk token cache.

* :func:`resolve_files` expands files, globs, directories and lists of those;
  :func:`default_corpus_files` lists the Python standard library's own sources, which every Python
  installation carries (no download needed).
* :func:`write_token_cache` tokenizes a selection of files once, appends EOS after each document,
  and writes the tokens to ``tokens-<key>.bin`` (``uint16`` or ``uint32``) plus
  ``tokens-<key>.json`` metadata. Both are written to temporary files and renamed into place, the
  metadata last, so an interrupted run never leaves a cache that looks complete;
  :func:`read_cache_meta` accepts a cache only when the token file has the recorded size.
* :class:`PackedWindows` serves fixed windows of the memory-mapped token file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_tp.checkpoint.layout import atomic_write
from lightning_tp.data.tokenizers import Tokenizer
from lightning_tp.errors import DataError

__all__ = [
    "DEFAULT_CORPUS_MAX_BYTES",
    "PackedWindows",
    "cache_key",
    "cache_paths",
    "default_corpus_files",
    "read_cache_meta",
    "resolve_files",
    "select_within",
    "write_token_cache",
]

#: Size cap of the embedded default corpus (the standard library's sources) when ``max_bytes`` is
#: ``None``.
DEFAULT_CORPUS_MAX_BYTES = 8_000_000

_CACHE_VERSION = 1
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                                  "lib2to3"})

#: ``(file, size, mtime_ns, bytes_to_read)`` of each file read into a cache.
Selection = list[tuple[Path, int, int, int]]


# -------------------------------------------------------------------------------- files


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_files(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files named by ``path``: a file, a glob (``**`` matches any depth), a directory (every
    file under it, hidden files and folders skipped) or a list of those. Absolute, de-duplicated,
    sorted.

    Raises:
        DataError: when an entry matches no file (the message names it).
    """
    entries = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not entries:
        raise DataError("`path` is an empty list. Fix: pass a file, a glob, a directory, or None"
                        " for the default.")
    files: set[Path] = set()
    for entry in entries:
        text = os.path.expanduser(os.fspath(entry))
        found: list[Path] = []
        if glob.has_magic(text):
            found = [Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p)]
        elif os.path.isdir(text):
            root = Path(text)
            found = [p for p in root.rglob("*") if p.is_file() and not _is_hidden(p, root)]
        elif os.path.isfile(text):
            found = [Path(text)]
        if not found:
            raise DataError(
                f"path={os.fspath(entry)!r} matches no file (cwd: {os.getcwd()!r}). Fix: pass an"
                " existing file, a directory, or a glob such as 'corpus/*.txt' or 'corpus/**/*.md';"
                " path=None uses the built-in corpus (the Python standard library's sources)."
            )
        files.update(p.resolve() for p in found)
    return sorted(files, key=str)


def default_corpus_files() -> list[Path]:
    """The embedded default corpus: the standard library's ``.py`` files, sorted by relative path,
    without ``site-packages`` and the ``test``/``tests``/``idlelib``/``lib2to3`` folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():  # pragma: no cover - every CPython has its stdlib sources
        raise DataError(f"The standard library folder {str(root)!r} is missing; pass `path=` to a"
                        " corpus instead.")
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                file = Path(dirpath) / name
                files.append((file.relative_to(root).as_posix(), file))
    files.sort()
    return [file for _, file in files]


def select_within(files: list[Path], max_bytes: int | None) -> Selection:
    """``(file, size, mtime_ns, bytes_to_read)`` for the files that fit in ``max_bytes`` (the last
    one truncated)."""
    selected: Selection = []
    total = 0
    for file in files:
        if max_bytes is not None and total >= max_bytes:
            break
        stat = file.stat()
        take = stat.st_size if max_bytes is None else min(stat.st_size, max_bytes - total)
        selected.append((file, stat.st_size, stat.st_mtime_ns, take))
        total += take
    return selected


# -------------------------------------------------------------------------------- token cache


def cache_key(tokenizer_name: str, selection: Selection, max_bytes: int | None) -> str:
    """Hash of the tokenizer name, the files read (path, size, mtime) and ``max_bytes``."""
    spec = {
        "version": _CACHE_VERSION,
        "tokenizer": tokenizer_name,
        "files": [[str(file), size, mtime] for file, size, mtime, _ in selection],
        "max_bytes": max_bytes,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """``(token file, metadata file)`` of the cache called ``key`` in ``cache_dir``."""
    return cache_dir / f"tokens-{key}.bin", cache_dir / f"tokens-{key}.json"


def read_cache_meta(token_file: Path, meta_file: Path, dtype: str) -> dict[str, Any] | None:
    """The metadata of a complete cache, or ``None`` when it is missing, unreadable or its token
    file has not the recorded size (``dtype`` is assumed when the metadata names none)."""
    if not (meta_file.is_file() and token_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    expected = int(meta.get("num_tokens", -1)) * np.dtype(meta.get("dtype", dtype)).itemsize
    return meta if token_file.stat().st_size == expected else None


def write_token_cache(
    tokenizer: Tokenizer,
    selection: Selection,
    dtype: str,
    cache_dir: Path,
    key: str,
    max_bytes: int | None,
) -> None:
    """Tokenize the selected files into the cache ``key`` of ``cache_dir`` (temporary files renamed
    into place).

    Each document is ``tokenizer.encode(text, eos=True)`` of the file's first ``bytes_to_read``
    bytes decoded as UTF-8 (invalid bytes replaced); empty files are no document.

    Raises:
        DataError: the tokenizer produced an id that does not fit ``dtype``.
    """
    token_file, meta_file = cache_paths(cache_dir, key)
    np_dtype = np.dtype(dtype)
    limit = np.iinfo(np_dtype).max
    num_tokens = num_bytes = num_docs = 0
    # Tokens first, metadata last, each all or nothing: the metadata file is the mark of a complete
    # cache.
    with atomic_write(token_file) as tmp_tokens, open(tmp_tokens, "wb") as out:
        for file, _, _, take in selection:
            if take == 0:
                continue  # an empty file is no document (no lone EOS)
            with open(file, "rb") as f:
                raw = f.read(take)
            ids = np.asarray(tokenizer.encode(raw.decode("utf-8", errors="replace"), eos=True))
            if ids.size and (ids.min() < 0 or ids.max() > limit):
                raise DataError(
                    f"Tokenizer {tokenizer.name!r} produced id {int(ids.max())} outside"
                    f" {np_dtype.name} for {str(file)!r} although its vocab_size is"
                    f" {tokenizer.vocab_size}."
                )
            ids.astype(np_dtype).tofile(out)
            num_tokens += int(ids.size)
            num_bytes += len(raw)
            num_docs += 1
    meta = {
        "version": _CACHE_VERSION,
        "key": key,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": np_dtype.name,
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "num_bytes": num_bytes,
        "max_bytes": max_bytes,
        "files": [str(file) for file, _, _, _ in selection],
    }
    with atomic_write(meta_file) as tmp_meta:
        tmp_meta.write_text(json.dumps(meta, indent=1))


# -------------------------------------------------------------------------------- dataset


class PackedWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens of a flat token file, served as ``{"input_ids", "labels"}``
    (int64).

    ``window_ids[i]`` is the window index (in units of ``seq_len + 1`` tokens from the start of the
    file) of sample ``i``. The memory map is opened lazily and not pickled, so DataLoader workers
    re-open it cheaply.
    """

    def __init__(self, token_file: str | Path, dtype: str, seq_len: int,
                 window_ids: np.ndarray) -> None:
        self.token_file = str(token_file)
        self.dtype = dtype
        self.seq_len = seq_len
        self.window_ids = np.asarray(window_ids, dtype=np.int64)
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The memory-mapped token file."""
        if self._tokens is None:
            self._tokens = np.memmap(self.token_file, dtype=self.dtype, mode="r")
        return self._tokens

    def __len__(self) -> int:
        return len(self.window_ids)

    def window(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``index``."""
        start = int(self.window_ids[index]) * (self.seq_len + 1)
        return self.tokens[start : start + self.seq_len + 1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.window(index).astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None  # pickling a memmap would copy the whole corpus
        return state
