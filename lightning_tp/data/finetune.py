"""Instruction and chat fine-tuning data as a :class:`~lightning.pytorch.LightningDataModule`.

Sources (one of):

* ``path``: a JSON file holding a list of records, a JSON Lines file (one record per line), or a
  directory of ``*.json`` / ``*.jsonl`` files. Two record formats are understood:

  - **Alpaca**: ``{"instruction": str, "input": str (optional), "output": str}``;
  - **chat**: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.

  ``format="auto"`` detects the format of each file from the keys of its first record.
* ``hf_dataset``: a Hugging Face ``datasets`` data set with the same record fields (needs
  ``datasets``).
* neither: a small instruction set generated deterministically in code
  (:func:`make_default_dataset`; simple string tasks with short answers, learnable by a tiny
  byte-level model), so examples run with no files and no network. With ``format="chat"`` its
  records are given as one user turn and one assistant turn.

Every example becomes a token sequence with a loss mask. Alpaca records are rendered with a prompt
template (:data:`PROMPT_TEMPLATES`); only the response and its EOS carry a label. Chat records are
rendered as ``<|role|>\\ncontent\\n`` turns, except that an assistant turn ends with EOS instead of
the newline; only the assistant contents and their EOS carry a label. A BOS token starts every
example when the tokenizer has one.

Batches are ``{"input_ids": (batch_size, seq_len) int64, "labels": (batch_size, seq_len) int64}``
with labels already shifted (``labels[:, t]`` is the target of input position ``t``) and masked
positions set to ``ignore_index``, as :class:`lightning_tp.training.module.CausalLMModule` expects.
``seq_len`` is fixed for every batch, so sequence parallelism can always split it.

Prompt templates, token-level rendering and the built-in set live in
:mod:`lightning_tp.data.instructions`, record reading and validation in
:mod:`lightning_tp.data.records`; their public names are re-exported here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_tp.data.instructions import (
    PROMPT_TEMPLATES,
    PromptTemplate,
    encode_chat,
    encode_instruction,
    format_prompt,
    get_template,
    make_default_dataset,
)
from lightning_tp.data.records import (
    CHAT_ROLES,
    Record,
    collect_records,
    data_files,
    iter_sources,
    load_hf_dataset,
)
from lightning_tp.data.samplers import data_parallel_replicas
from lightning_tp.data.tokenizers import Tokenizer, load_tokenizer
from lightning_tp.errors import DataError  # one DataError for all data modules

__all__ = [
    "CHAT_ROLES",
    "PROMPT_TEMPLATES",
    "DataError",
    "FinetuneDataModule",
    "PromptTemplate",
    "Record",
    "TokenDataset",
    "encode_chat",
    "encode_instruction",
    "format_prompt",
    "get_template",
    "make_default_dataset",
]


# -------------------------------------------------------------------------------- tensors


class TokenDataset(Dataset):
    """Rows of ``input_ids`` and shifted ``labels``; items are
    ``{"input_ids": (seq_len,), "labels": (seq_len,)}``."""

    def __init__(self, input_ids: Tensor, labels: Tensor) -> None:
        if input_ids.shape != labels.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)}"
                             " differ in shape")
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def _rows(
    sequences: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """One ``(input_ids, labels)`` row per token sequence of at most ``seq_len + 1`` tokens,
    padded."""
    input_rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    for tokens, mask in sequences:
        fill = seq_len + 1 - len(tokens)
        input_rows.append(tokens[:-1] + [pad_id] * fill)
        label_rows.append([t if m else ignore_index
                           for t, m in zip(tokens[1:], mask[1:], strict=True)]
                           + [ignore_index] * fill)
    input_ids = torch.tensor(input_rows, dtype=torch.int64).reshape(len(sequences), seq_len)
    labels = torch.tensor(label_rows, dtype=torch.int64).reshape(len(sequences), seq_len)
    return input_ids, labels


def _pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of item indices with total length ≤ ``capacity``; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: dict[int, list[int]] = {}  # remaining capacity -> bins with exactly that much room
    capacities: list[int] = []  # sorted keys of `free`
    for i in order:
        size = lengths[i]
        j = bisect.bisect_left(capacities, size)
        if j < len(capacities):
            room = capacities[j]
            b = free[room].pop()
            if not free[room]:
                del free[room]
                capacities.pop(j)
            bins[b].append(i)
            rest = room - size
        else:
            b = len(bins)
            bins.append([i])
            rest = capacity - size
        if rest > 0:
            if rest not in free:
                free[rest] = []
                bisect.insort(capacities, rest)
            free[rest].append(b)
    for items in bins:
        items.sort()
    bins.sort(key=lambda items: items[0])
    return bins


# -------------------------------------------------------------------------------- datamodule


class FinetuneDataModule(L.LightningDataModule):
    """Instruction / chat fine-tuning data with a fixed ``seq_len``, masked prompts and dp-sharded
    loaders.

    Args:
        path: a JSON-array or JSON Lines file, or a directory of ``*.json``/``*.jsonl`` files.
            ``None`` (and no ``hf_dataset``) uses the built-in example set
            (:func:`make_default_dataset`), as chat records when ``format="chat"``.
        format: ``"auto"`` (per file, from the keys of the first record), ``"alpaca"`` or
            ``"chat"``.
        tokenizer: ``"byte"`` or a ``tokenizer.json`` / directory containing one (see
            :func:`lightning_tp.data.tokenizers.load_tokenizer`).
        seq_len: length of every row of ``input_ids`` and ``labels``. Examples longer than
            ``seq_len + 1`` tokens are truncated (``num_truncated``); those left with no labelled
            token are dropped (``num_dropped``).
        batch_size: rows per batch on each data-parallel rank.
        val_fraction: fraction of the records held out for validation (``0 <= val_fraction < 1``);
            the split is made over records with ``seed``, so it does not depend on ``seq_len`` or
            ``packing``.
        seed: seed of the train/val split and of the training shuffle (per epoch, through the
            sampler).
        packing: put several whole examples into each row (best-fit decreasing) instead of one
            example per row. Labels keep their masks; a document boundary is just EOS (attention is
            not reset).
        template: prompt template name for Alpaca records (:data:`PROMPT_TEMPLATES`).
        skip_malformed: skip (and count in ``num_skipped``, with a warning) malformed records
            instead of raising :class:`DataError`.
        hf_dataset: name or path for :func:`datasets.load_dataset`; excludes ``path``.
        hf_split: split of ``hf_dataset``.
        ignore_index: label of positions without loss (must not be a token id).
        num_workers: ``DataLoader`` worker processes.

    After :meth:`setup`: ``train_dataset``/``val_dataset`` (:class:`TokenDataset`),
    ``num_train``/``num_val`` (rows), ``num_train_examples``/``num_val_examples`` (examples in
    them), ``records`` (validated records in source order), ``train_indices``/``val_indices``
    (indices into ``records`` of the examples used), and the counters ``num_skipped``,
    ``num_truncated``, ``num_dropped``. ``tokenizer`` is available right away.
    """

    def __init__(
        self,
        path: str | None = None,
        format: str = "auto",
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        packing: bool = False,
        template: str = "alpaca",
        skip_malformed: bool = False,
        hf_dataset: str | None = None,
        hf_split: str = "train",
        ignore_index: int = -100,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_int("seq_len", seq_len, minimum=1,
                   fix="use the model's training context, e.g. seq_len=256")
        _check_int("batch_size", batch_size, minimum=1, fix="e.g. batch_size=8")
        _check_int("seed", seed, minimum=None, fix="pass an integer, e.g. seed=0")
        _check_int("num_workers", num_workers, minimum=0, fix="e.g. num_workers=0")
        _check_int("ignore_index", ignore_index, minimum=None,
                   fix="keep the default ignore_index=-100")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
            0.0 <= float(val_fraction) < 1.0
        ):
            raise DataError(f"val_fraction must be in [0, 1), got val_fraction={val_fraction!r}."
                            " Fix: e.g. val_fraction=0.1, or 0 for no validation set.")
        if format not in ("auto", "alpaca", "chat"):
            raise DataError(f"Unknown data format: format={format!r}. Fix: use 'auto', 'alpaca' or"
                            " 'chat'.")
        self.template = get_template(template)
        if path is not None and hf_dataset is not None:
            raise DataError(f"Both path={path!r} and hf_dataset={hf_dataset!r} were given. Fix:"
                            " pass only one.")
        if path is not None:
            data_files(Path(path))  # fail now, not after the trainer has started
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        if 0 <= ignore_index < self.tokenizer.vocab_size:
            raise DataError(
                f"ignore_index={ignore_index} is a token id of tokenizer {self.tokenizer.name!r}"
                f" (vocab_size {self.tokenizer.vocab_size}). Fix: use a negative value, e.g."
                " ignore_index=-100."
            )
        self.save_hyperparameters()
        self.path = path
        self.format = format
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.packing = bool(packing)
        self.skip_malformed = bool(skip_malformed)
        self.hf_dataset = hf_dataset
        self.hf_split = hf_split
        self.ignore_index = ignore_index
        self.num_workers = num_workers

        self.records: list[Record] = []
        self.train_indices: list[int] = []
        self.val_indices: list[int] = []
        self.train_dataset: TokenDataset | None = None
        self.val_dataset: TokenDataset | None = None
        self.num_train = self.num_val = 0
        self.num_train_examples = self.num_val_examples = 0
        self.num_skipped = self.num_truncated = self.num_dropped = 0
        self.skipped_reasons: list[str] = []

    # ------------------------------------------------------------------ loading

    def prepare_data(self) -> None:
        """Download ``hf_dataset`` into the ``datasets`` cache (called on one process per node)."""
        if self.hf_dataset is not None:
            load_hf_dataset(self.hf_dataset, self.hf_split)

    def _load_records(self) -> list[Record]:
        sources = iter_sources(self.path, self.hf_dataset, self.hf_split,
                               chat=self.format == "chat")
        records, skipped = collect_records(sources, self.format, self.skip_malformed)
        self.num_skipped = len(skipped)
        self.skipped_reasons = skipped
        if skipped:
            shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            rank_zero_warn(f"Skipped {len(skipped)} malformed record(s) (skip_malformed=True):"
                           f" {shown}")
        return records

    # ------------------------------------------------------------------ building

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, tokenize, split and pack the data into tensors (once; later calls do
        nothing)."""
        if self.train_dataset is not None:
            return
        records = self._load_records()
        if not records:
            raise DataError(
                f"No usable records in {self._describe_source()}"
                f"{f' ({self.num_skipped} malformed skipped)' if self.num_skipped else ''}"
                ". Fix: point `path` at a file with at least one record per line (JSONL) or a JSON"
                " array of them."
            )
        n = len(records)
        n_val = 0 if self.val_fraction == 0 else min(n - 1, max(1, round(n * self.val_fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        split = {"val": sorted(perm[:n_val]), "train": sorted(perm[n_val:])}

        encoded: dict[int, tuple[list[int], list[bool]]] = {}
        truncated = dropped = 0
        limit = self.seq_len + 1
        for i, record in enumerate(records):
            tokens, mask = record.encode(self.tokenizer, self.template)
            if len(tokens) > limit:
                truncated += 1
                tokens, mask = tokens[:limit], mask[:limit]
            if not any(mask[1:]):
                dropped += 1
                continue
            encoded[i] = (tokens, mask)
        self.records = records
        self.num_truncated, self.num_dropped = truncated, dropped
        if truncated:
            rank_zero_warn(
                f"{truncated} of {n} examples were longer than seq_len + 1 = {limit} tokens and"
                f" were truncated; {dropped} of them lost their whole response and were dropped."
                " Fix: raise seq_len or shorten the examples."
            )
        self.train_indices = [i for i in split["train"] if i in encoded]
        self.val_indices = [i for i in split["val"] if i in encoded]
        if not self.train_indices:
            shortest = min(len(record.encode(self.tokenizer, self.template)[0])
                           for record in records)
            raise DataError(
                f"No training examples left out of {n} records from {self._describe_source()}"
                f" (seq_len={self.seq_len}: {dropped} dropped because their response did not fit,"
                f" the shortest example has {shortest} tokens; {len(split['val'])} held out for"
                " validation). Fix: raise seq_len (e.g."
                f" seq_len={max(2 * self.seq_len, shortest + 32)}), use a shorter prompt template"
                " (e.g. template='plain'), or lower val_fraction."
            )
        self.train_dataset = self._build([encoded[i] for i in self.train_indices])
        self.val_dataset = self._build([encoded[i] for i in self.val_indices])
        self.num_train, self.num_val = len(self.train_dataset), len(self.val_dataset)
        self.num_train_examples, self.num_val_examples = (len(self.train_indices),
                                                          len(self.val_indices))

    def _build(self, examples: list[tuple[list[int], list[bool]]]) -> TokenDataset:
        pad_id = self.tokenizer.pad_id
        if self.packing:
            bins = _pack([len(tokens) for tokens, _ in examples], self.seq_len + 1)
            examples = [
                ([t for i in items for t in examples[i][0]],
                 [m for i in items for m in examples[i][1]])
                for items in bins
            ]
        return TokenDataset(*_rows(examples, self.seq_len, pad_id, self.ignore_index))

    def _describe_source(self) -> str:
        if self.hf_dataset is not None:
            return f"hf_dataset={self.hf_dataset!r} split {self.hf_split!r}"
        return f"path={self.path!r}" if self.path is not None else "the built-in data set"

    # ------------------------------------------------------------------ loaders

    def _replicas(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` over the data-parallel ranks of the attached trainer; ``(1, 0)``
        without."""
        return data_parallel_replicas(getattr(self, "trainer", None))

    def _loader(self, dataset: TokenDataset, train: bool) -> DataLoader:
        num_replicas, rank = self._replicas()
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=train, seed=self.seed,
            drop_last=train
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Full training batches only (a tiny last batch is a noisy step), unless there is not
            # even one.
            drop_last=train and len(sampler) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Training rows, shuffled per epoch with ``seed`` and sharded over the data-parallel ranks.

        Every rank gets the same number of rows (the sampler drops the remainder) and only full
        batches, unless a rank has fewer rows than ``batch_size``.
        """
        self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation rows in order, sharded over the data-parallel ranks (empty when
        ``val_fraction=0``)."""
        self.setup("validate")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, train=False)


def _check_int(name: str, value: Any, minimum: int | None, fix: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, int)
            or (minimum is not None and value < minimum)):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise DataError(f"{name} must be {need}, got {name}={value!r}. Fix: {fix}.")

