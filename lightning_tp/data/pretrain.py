"""Pretraining data: plain-text files tokenized once into a memory-mapped token cache, packed into
fixed windows.

:class:`PretrainDataModule` turns a corpus (files, globs, directories, or — with ``path=None`` — the
Python standard library's own sources, which every Python installation carries, so no download is
ever needed) into ``{"input_ids", "labels"}`` batches for :class:`~lightning_tp.CausalLMModule`:

1. ``prepare_data`` (once per node) tokenizes every document once, appends EOS after each, and
   writes the tokens to ``<cache_dir>/<key>.bin`` (``uint16`` when the vocabulary fits, else
   ``uint32``) plus ``<key>.json`` metadata. Both are written to temporary files and renamed into
   place, the metadata last, so an interrupted run never leaves a cache that looks complete. The key
   hashes the tokenizer, the files (path, size, mtime) and ``max_bytes``: a changed file or
   tokenizer gives a new cache, an unchanged corpus reuses the old one.
2. ``setup`` memory-maps the tokens and cuts them into non-overlapping windows of ``seq_len + 1``
   tokens (documents packed back to back, the last partial window dropped).
   ``input_ids = window[:-1]`` and ``labels = window[1:]``.
3. The train loader shards the windows over the **data-parallel** ranks only (tensor-parallel ranks
   of one data-parallel group read the same samples) with :class:`ResumableDistributedSampler`,
   which also makes a resumed run continue with exactly the batches an uninterrupted run would have
   seen.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_tp.data import corpus
from lightning_tp.data.corpus import (
    DEFAULT_CORPUS_MAX_BYTES,
    PackedWindows,
    default_corpus_files,
    resolve_files,
)
from lightning_tp.data.samplers import (
    ResumableDataLoader,
    ResumableDistributedSampler,
    data_parallel_replicas,
)
from lightning_tp.data.tokenizers import Tokenizer, load_tokenizer
from lightning_tp.errors import DataError

__all__ = [
    "DEFAULT_CORPUS_MAX_BYTES",
    "DataError",
    "PackedWindows",
    "PretrainDataModule",
    "ResumableDistributedSampler",
    "default_corpus_files",
    "resolve_files",
]


def _check_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name}={value!r} is invalid: it must be an integer >= {minimum}. Fix:"
                        f" {fix}")


class PretrainDataModule(L.LightningDataModule):
    """Causal-LM pretraining batches from plain-text files, packed into windows of ``seq_len + 1``
    tokens.

    Args:
        path: a file, a glob (``corpus/*.txt``; ``**`` matches any depth), a directory (all
            non-hidden files under it) or a list of those. ``None`` is the embedded default corpus:
            the Python standard library's ``.py`` sources (no download, present on every Python
            installation).
        tokenizer: ``"byte"`` or a ``tokenizer.json`` / a folder with one (see
            :func:`load_tokenizer`). Loaded here, as :attr:`tokenizer`, so that it can be checked
            against the model's vocabulary before training.
        seq_len: tokens per sample; every window holds ``seq_len + 1`` tokens (inputs and the
            shifted labels).
        batch_size: samples per batch on each data-parallel rank.
        val_fraction: share of the windows held out for validation (at least one window). The
            held-out windows are spread evenly over the corpus, independent of ``seed``, so every
            run validates on the same data.
        seed: seed of the training order; epoch ``e`` is shuffled with ``seed + e``.
        cache_dir: where the token caches are written (relative paths are relative to the working
            directory; shared by the ranks of a node).
        max_bytes: cap on the bytes read from the corpus (files in sorted order, the last one cut).
            ``None``: no cap for ``path``, :data:`DEFAULT_CORPUS_MAX_BYTES` for the default corpus.
        num_workers: DataLoader worker processes.

    The train/validation split and the training order are identical on every rank; the train and
    validation loaders shard them over the data-parallel ranks
    (``trainer.distributed_sampler_kwargs``), so the tensor-parallel ranks of a data-parallel group
    read the same samples. :meth:`state_dict` holds the position in the training order and is saved
    in Lightning checkpoints: resuming continues with exactly the batches an uninterrupted run would
    have produced next (same corpus, tokenizer, ``seq_len``, ``batch_size``, ``seed``). This holds
    for checkpoints saved during training (``ModelCheckpoint`` after a batch, after validation, at
    the end of an epoch). A run that *stopped* at ``max_steps`` is recorded by Lightning as having
    finished its epoch, so resuming it starts the next epoch (Lightning's own epoch bookkeeping; the
    order follows it).

    Raises:
        DataError: at construction for invalid values, a path matching no file or an empty corpus;
            in :meth:`setup` for a corpus too short for one training and one validation window.
    """

    def __init__(
        self,
        path: str | list[str] | None = None,
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        seed: int = 0,
        cache_dir: str = ".cache/lightning_tp",
        max_bytes: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_int("seq_len", seq_len, 1,
                   "pass a positive number of tokens per sample, e.g. seq_len=256.")
        _check_int("batch_size", batch_size, 1,
                   "pass a positive number of samples per batch, e.g. batch_size=8.")
        _check_int("num_workers", num_workers, 0,
                   "pass 0 (load in the main process) or a number of workers.")
        _check_int("seed", seed, 0, "pass a non-negative integer seed.")
        if max_bytes is not None:
            _check_int("max_bytes", max_bytes, 1, "pass a positive byte count, or None for no cap.")
        if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
                or not 0 < val_fraction < 1):
            raise DataError(
                f"val_fraction={val_fraction!r} is invalid: it must be a number strictly between 0"
                " and 1. Fix: pass e.g. val_fraction=0.05 (5% of the windows are held out for"
                " validation)."
            )
        self.save_hyperparameters()
        self.path = path
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.num_workers = int(num_workers)
        if path is None:
            self.files = default_corpus_files()
            self.max_bytes: int | None = (DEFAULT_CORPUS_MAX_BYTES if max_bytes is None
                                          else int(max_bytes))
        else:
            self.files = resolve_files(path)
            self.max_bytes = None if max_bytes is None else int(max_bytes)
        if not any(size for _, size, _, _ in corpus.select_within(self.files, None)):
            raise DataError(
                f"The corpus path={path!r} is empty: its {len(self.files)} file(s) hold 0 bytes."
                " Fix: point `path` at files with text in them."
            )
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        self.dtype = "uint16" if self.tokenizer.vocab_size < 2**16 else "uint32"

        self.train_dataset: PackedWindows | None = None
        self.val_dataset: PackedWindows | None = None
        self._meta: dict[str, Any] | None = None
        self._cache_key: str | None = None
        self._train_sampler: ResumableDistributedSampler | None = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ cache

    def _selection(self) -> corpus.Selection:
        return corpus.select_within(self.files, self.max_bytes)

    def cache_key(self) -> str:
        """Hash of the tokenizer name, the files read (path, size, mtime) and ``max_bytes``."""
        return corpus.cache_key(self.tokenizer.name, self._selection(), self.max_bytes)

    def cache_paths(self) -> tuple[Path, Path]:
        """``(token file, metadata file)`` of the current corpus and tokenizer."""
        return corpus.cache_paths(self.cache_dir, self.cache_key())

    def _read_meta(self) -> dict[str, Any] | None:
        return corpus.read_cache_meta(*self.cache_paths(), dtype=self.dtype)

    def prepare_data(self) -> None:
        """Tokenize the corpus into the cache, unless a cache for this corpus and tokenizer exists.

        Each document is ``tokenizer.encode(text, eos=True)`` of the file decoded as UTF-8 (invalid
        bytes replaced). Lightning calls this once per node, on local rank 0, before :meth:`setup`.
        """
        if self._read_meta() is not None:
            return
        selection = self._selection()
        key = corpus.cache_key(self.tokenizer.name, selection, self.max_bytes)
        corpus.write_token_cache(self.tokenizer, selection, self.dtype, self.cache_dir, key,
                                 self.max_bytes)

    # ------------------------------------------------------------------ split

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cache, cut it into windows and split them into train and validation
        (idempotent).

        Without a cache (``setup`` called directly, not by a Trainer) a single process builds it
        here.

        Raises:
            DataError: the corpus gives fewer than two windows of ``seq_len + 1`` tokens.
        """
        if self.train_dataset is not None:
            return
        meta = self._read_meta()
        if meta is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise DataError(
                    f"No token cache for this corpus in cache_dir={str(self.cache_dir)!r} on this"
                    " rank. prepare_data() builds it once per node: keep"
                    " Trainer(prepare_data_per_node=True), or use a cache_dir that every node can"
                    " read."
                )
            self.prepare_data()
            meta = self._read_meta()
            assert meta is not None
        window = self.seq_len + 1
        num_windows = int(meta["num_tokens"]) // window
        if num_windows < 2:
            raise DataError(
                f"The corpus is too short: it has {meta['num_tokens']} tokens but one training and"
                f" one validation window of seq_len + 1 = {window} tokens need {2 * window}. Fix:"
                f" add text, lower seq_len (now {self.seq_len})"
                + (f", or raise max_bytes (now {self.max_bytes})." if self.max_bytes else ".")
            )
        num_val = min(num_windows - 1, max(1, round(self.val_fraction * num_windows)))
        # Validation windows are spread evenly over the corpus (deterministic, independent of
        # `seed`).
        val_ids = np.unique(np.linspace(0, num_windows - 1, num_val).round().astype(np.int64))
        train_ids = np.setdiff1d(np.arange(num_windows, dtype=np.int64), val_ids,
                                 assume_unique=True)
        token_file, _ = self.cache_paths()
        self._meta = meta
        self._cache_key = str(meta["key"])
        self.train_dataset = PackedWindows(token_file, meta["dtype"], self.seq_len, train_ids)
        self.val_dataset = PackedWindows(token_file, meta["dtype"], self.seq_len, val_ids)

    def _require_setup(self) -> tuple[PackedWindows, PackedWindows]:
        if self.train_dataset is None or self.val_dataset is None:
            raise DataError("The datasets exist after setup(): call dm.prepare_data();"
                            " dm.setup('fit') first.")
        return self.train_dataset, self.val_dataset

    @property
    def num_train_sequences(self) -> int:
        """Training windows in the whole corpus (all data-parallel ranks together)."""
        return len(self._require_setup()[0])

    @property
    def num_val_sequences(self) -> int:
        """Validation windows in the whole corpus (all data-parallel ranks together)."""
        return len(self._require_setup()[1])

    @property
    def num_tokens(self) -> int:
        """Tokens in the cache, EOS separators included."""
        self._require_setup()
        assert self._meta is not None
        return int(self._meta["num_tokens"])

    # ------------------------------------------------------------------ loaders

    def _replicas(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of the data-parallel dimension; ``(1, 0)`` without a distributed
        trainer."""
        return data_parallel_replicas(self.trainer)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled (``seed + epoch``), sharded over the data-parallel ranks, full batches only,
        resumable."""
        train, _ = self._require_setup()
        num_replicas, rank = self._replicas()
        sampler = ResumableDistributedSampler(train, num_replicas=num_replicas, rank=rank,
                                              seed=self.seed)
        if sampler.num_samples < self.batch_size:
            raise DataError(
                f"Each of the {num_replicas} data-parallel rank(s) gets {sampler.num_samples} of"
                f" the {len(train)} training windows, fewer than batch_size={self.batch_size}: no"
                " full batch. Fix: lower batch_size or seq_len, or use a larger corpus."
            )
        self._train_sampler = sampler
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
        return ResumableDataLoader(train, sampler=sampler, drop_last=True, datamodule=self,
                                   **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """In corpus order, sharded over the data-parallel ranks (padded by repeating up to
        ``num_replicas - 1`` windows so that every rank has the same number of batches)."""
        _, val = self._require_setup()
        num_replicas, rank = self._replicas()
        sampler = DistributedSampler(val, num_replicas=num_replicas, rank=rank, shuffle=False,
                                     drop_last=False)
        return DataLoader(val, sampler=sampler, drop_last=False, **self._loader_kwargs())

    # ------------------------------------------------------------------ resumable state

    def _batches_per_epoch(self) -> int | None:
        if self._train_sampler is None:
            return None
        return self._train_sampler.num_samples // self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "consumed", "num_replicas", ...}``: the training position (samples per
        data-parallel rank).

        With a Trainer attached the position is the fit loop's count of trained batches times
        ``batch_size`` (exact whatever ``num_workers`` prefetches); otherwise the sampler's count of
        yielded samples.
        """
        sampler = self._train_sampler
        if sampler is None:
            state = dict(self._pending_state
                         or {"epoch": 0, "consumed": 0, "num_replicas": self._replicas()[0]})
        else:
            state = sampler.state_dict()
            trainer = self.trainer
            if trainer is not None:
                progress = trainer.fit_loop.epoch_loop.batch_progress.current
                # `processed` counts a batch as soon as its training step ran (checkpoints saved in
                # on_train_batch_end precede `completed`); the sampler's count guards the epoch
                # boundary, where set_epoch has already reset it but the loop's counter still holds
                # the previous epoch.
                state["consumed"] = min(int(progress.processed) * self.batch_size, sampler.consumed)
        state.update(seed=self.seed, batch_size=self.batch_size, seq_len=self.seq_len,
                     cache_key=self._cache_key)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order from :meth:`state_dict` (applied to the train sampler when it
        is created)."""
        # the batch is compared per step, once the replicas are known
        for name in ("seed", "seq_len", "cache_key"):
            saved = state_dict.get(name)
            current = self._cache_key if name == "cache_key" else getattr(self, name)
            if saved is not None and current is not None and saved != current:
                warnings.warn(
                    f"The data state was saved with {name}={saved!r} but this run has"
                    f" {name}={current!r}: the resumed data order will not continue the interrupted"
                    " run's order.",
                    stacklevel=2,
                )
        self._pending_state = dict(state_dict)
        if self._train_sampler is not None:
            self._apply_state(self._pending_state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self._train_sampler is not None
        # What must match is the global batch (per-rank batch × data-parallel replicas): resharding
        # from dp=2 to dp=1 with twice the per-rank batch continues the same order exactly.
        saved_batch, saved_replicas = state.get("batch_size"), state.get("num_replicas")
        if saved_batch is not None and saved_replicas is not None:
            saved_global = int(saved_batch) * int(saved_replicas)
            current_global = self.batch_size * self._train_sampler.num_replicas
            if saved_global != current_global:
                warnings.warn(
                    f"The data state was saved with a global batch of {saved_global} samples"
                    f" ({saved_batch} x {saved_replicas} data-parallel ranks) but this run's is"
                    f" {current_global}: the resumed data order will not continue the interrupted"
                    " run's order.",
                    stacklevel=2,
                )
        sampler_state = {k: int(state[k]) for k in ("epoch", "consumed", "num_replicas")
                         if k in state}
        self._train_sampler.load_state_dict(sampler_state)
        per_epoch = self._batches_per_epoch()
        if per_epoch is not None and self._train_sampler.consumed >= per_epoch * self.batch_size:
            # Only a partial batch (dropped) is left of this epoch: continue at the start of the
            # next one.
            sampler = self._train_sampler
            sampler.load_state_dict({"epoch": sampler.epoch + 1, "consumed": 0,
                                     "num_replicas": sampler.num_replicas})
        self._pending_state = None

    @staticmethod
    def describe_default_corpus(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> dict[str, int]:
        """``{"files", "bytes"}`` the default corpus reads under ``max_bytes`` (nothing is
        tokenized)."""
        selection = corpus.select_within(default_corpus_files(), max_bytes)
        return {"files": len(selection), "bytes": sum(take for _, _, _, take in selection)}
