"""Instruction and chat fine-tuning data as a :class:`~lightning.pytorch.LightningDataModule`.

Sources (one of):

* ``path``: a JSON file holding a list of records, a JSON Lines file (one record per line), or a directory of
  ``*.json`` / ``*.jsonl`` files. Two record formats are understood:

  - **Alpaca**: ``{"instruction": str, "input": str (optional), "output": str}``;
  - **chat**: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.

  ``format="auto"`` detects the format of each file from the keys of its first record.
* ``hf_dataset``: a Hugging Face ``datasets`` data set with the same record fields (needs ``datasets``).
* neither: a small instruction set generated deterministically in code (:func:`make_default_dataset`; simple
  string tasks with short answers, learnable by a tiny byte-level model), so examples run with no files and no
  network. With ``format="chat"`` its records are given as one user turn and one assistant turn.

Every example becomes a token sequence with a loss mask. Alpaca records are rendered with a prompt template
(:data:`PROMPT_TEMPLATES`); only the response and its EOS carry a label. Chat records are rendered as
``<|role|>\\ncontent\\n`` turns, except that an assistant turn ends with EOS instead of the newline; only the
assistant contents and their EOS carry a label. A BOS token starts every example when the tokenizer has one.

Batches are ``{"input_ids": (batch_size, seq_len) int64, "labels": (batch_size, seq_len) int64}`` with labels
already shifted (``labels[:, t]`` is the target of input position ``t``) and masked positions set to
``ignore_index``, as :class:`lightning_tp.lightning_module.CausalLMModule` expects. ``seq_len`` is fixed for every
batch, so sequence parallelism can always split it.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_tp.data.pretrain import DataError  # one DataError for all data modules
from lightning_tp.data.tokenizers import Tokenizer, load_tokenizer

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


# ---------------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt for Alpaca-style records: ``str.format`` patterns with ``{instruction}`` (and ``{input}``).

    The rendered prompt is followed directly by the response; it should therefore end with the response header.
    Literal braces in a pattern must be doubled (``{{``), as for :meth:`str.format`.
    """

    name: str
    no_input: str
    with_input: str

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt for ``instruction`` (and ``input``, when not empty)."""
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


#: Named prompt templates; add an entry to make a new ``template=`` name available.
PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        no_input=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the"
            " request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context."
            " Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
            "### Input:\n{input}\n\n### Response:\n"
        ),
    ),
    "plain": PromptTemplate(
        name="plain",
        no_input="### Instruction:\n{instruction}\n\n### Response:\n",
        with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    ),
}

#: Roles allowed in chat records.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")


def get_template(name: str) -> PromptTemplate:
    """The registered :class:`PromptTemplate` called ``name``; :class:`DataError` naming the choices otherwise."""
    try:
        return PROMPT_TEMPLATES[name]
    except (KeyError, TypeError):
        raise DataError(
            f"Unknown prompt template: template={name!r}. Fix: use one of {sorted(PROMPT_TEMPLATES)}, or add a"
            " PromptTemplate to lightning_tp.data.finetune.PROMPT_TEMPLATES."
        ) from None


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt text for an instruction (and optional input), exactly as used in training.

    Generating after this text (with a BOS token first, if the tokenizer has one) continues with a response.
    """
    return get_template(template).render(instruction, input)


# ---------------------------------------------------------------------------------------------------- encoding


def encode_instruction(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[bool]]:
    """``(tokens, loss_mask)`` of a prompt followed by its response: ``[BOS] prompt response EOS``.

    The prompt and the response are tokenized separately, so the boundary between them is exact;
    ``loss_mask`` is ``True`` on the response tokens and the EOS only.
    """
    prompt_ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    response_ids = tokenizer.encode(response, eos=True)
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """``(tokens, loss_mask)`` of a conversation given as ``(role, content)`` pairs.

    A BOS (if any), then one ``<|role|>\\ncontent\\n`` turn per message, except that an assistant turn ends
    with EOS in place of the newline. ``loss_mask`` is ``True`` on assistant contents and their EOS only.
    With ``add_generation_prompt`` an ``<|assistant|>\\n`` header is appended (for generation).
    """
    tokens: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    mask: list[bool] = [False] * len(tokens)
    for role, content in messages:
        if role == "assistant":
            header = tokenizer.encode("<|assistant|>\n")
            body = tokenizer.encode(content, eos=True)
            tokens += header + body
            mask += [False] * len(header) + [True] * len(body)
        else:
            turn = tokenizer.encode(f"<|{role}|>\n{content}\n")
            tokens += turn
            mask += [False] * len(turn)
    if add_generation_prompt:
        header = tokenizer.encode("<|assistant|>\n")
        tokens += header
        mask += [False] * len(header)
    return tokens, mask


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One validated record. ``messages`` is set for chat records, ``instruction``/``input``/``output`` otherwise;
    ``source`` says where it came from (``file:line``, a JSON array index, a data set row)."""

    source: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: tuple[tuple[str, str], ...] | None = None

    def encode(self, tokenizer: Tokenizer, template: PromptTemplate) -> tuple[list[int], list[bool]]:
        """``(tokens, loss_mask)`` of this record (see :func:`encode_instruction` and :func:`encode_chat`)."""
        if self.messages is not None:
            return encode_chat(tokenizer, self.messages)
        return encode_instruction(tokenizer, template.render(self.instruction, self.input), self.output)


class _Malformed(Exception):
    """A record-level problem: raised as :class:`DataError`, or skipped with ``skip_malformed=True``."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _detect_format(obj: Any) -> str | None:
    if isinstance(obj, Mapping):
        if "messages" in obj:
            return "chat"
        if "instruction" in obj:
            return "alpaca"
    return None


def _text_field(obj: Mapping[str, Any], key: str, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise _Malformed(f"missing {key!r}")
        return ""
    if not isinstance(value, str):
        raise _Malformed(f"field {key!r} must be a string, got {_json_type(value)}")
    if required and not value.strip():
        raise _Malformed(f"empty {key!r}")
    return value


def _parse_record(obj: Any, fmt: str, source: str) -> Record:
    """Validate one decoded record of format ``fmt`` (``"alpaca"`` or ``"chat"``); raise :class:`_Malformed`."""
    if isinstance(obj, _Malformed):
        raise obj
    if not isinstance(obj, Mapping):
        raise _Malformed(f"expected a JSON object, got {_json_type(obj)}")
    if fmt == "alpaca":
        return Record(
            source=source,
            instruction=_text_field(obj, "instruction", required=True),
            input=_text_field(obj, "input", required=False),
            output=_text_field(obj, "output", required=True),
        )
    messages = obj.get("messages")
    if messages is None:
        raise _Malformed("missing 'messages' (a chat record needs a list of {'role', 'content'} objects)")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise _Malformed(f"'messages' must be a non-empty array, got {_json_type(messages)}")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _Malformed(f"messages[{i}] must be an object with 'role' and 'content', got {_json_type(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise _Malformed(f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str):
            raise _Malformed(f"messages[{i}]: 'content' must be a string, got {_json_type(content)}")
        if role == "assistant" and not content.strip():
            raise _Malformed(f"messages[{i}]: empty assistant content")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise _Malformed("no assistant turn in 'messages' (nothing to learn)")
    return Record(source=source, messages=tuple(turns))


def _read_file(file: Path) -> list[tuple[str, Any]]:
    """``(location, decoded record or _Malformed)`` pairs of a JSON-array or JSON Lines file."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Could not read data file {str(file)!r}: {e}") from e
    stripped = text.lstrip()
    whole: Any = None
    if stripped.startswith("[") or (stripped.startswith("{") and file.suffix.lower() == ".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if stripped.startswith("["):
                raise DataError(
                    f"{file}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}). A file starting with '[' must"
                    " be one JSON array of records; fix the JSON, or write one record per line (JSON Lines)."
                ) from e
            whole = None  # a .json file holding JSON Lines
        if whole is not None and not isinstance(whole, list):
            raise DataError(
                f"{file}: the file holds a single JSON {_json_type(whole).split()[-1]}; expected a JSON array of"
                " records or JSON Lines (one record per line). Fix: wrap the records in [...] or write JSONL."
            )
    if isinstance(whole, list):
        return [(f"{file}: record {i} of the JSON array", obj) for i, obj in enumerate(whole)]
    items: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold a raw U+2028
        if not line.strip():
            continue
        try:
            items.append((f"{file}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            items.append((f"{file}:{lineno}", _Malformed(f"invalid JSON ({e.msg}, column {e.colno})")))
    return items


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise DataError(f"No *.json or *.jsonl files in path={str(path)!r}. Fix: point `path` at a data file or"
                            " a directory containing some.")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"Data path does not exist: path={str(path)!r}. Fix: pass an existing JSON/JSONL file or"
                    " directory, or path=None for the built-in example data set.")


# ---------------------------------------------------------------------------------------------------- default set

_WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum "
    "river ocean lake hill stone cloud storm rain snow wind "
    "tiger zebra horse mouse eagle whale shark camel panda otter "
    "house table chair door window lamp clock bottle cup spoon "
    "green yellow purple orange silver black white brown pink blue "
    "happy quick quiet brave calm proud lucky sunny funny gentle "
    "run jump swim read write sing dance climb build paint "
    "music paper pencil garden forest castle bridge rocket planet star "
    "bread honey sugar butter cheese pizza pasta salad soup cake "
    "king queen pilot farmer doctor artist baker sailor teacher robot "
    "moon sun earth fire water light shadow dream magic story "
    "red big small tall short fast slow warm cold soft"
).split()


def make_default_dataset(num_examples: int = 3000, seed: int = 1234) -> list[dict[str, str]]:
    """A deterministic instruction set of simple string tasks with short answers (no files, no network).

    Tasks: reverse a word, write a sentence in uppercase, count the letters of a word, sort a few small numbers,
    add two numbers, repeat a word ``n`` times; built from a fixed word list with ``random.Random(seed)``.
    Records are unique and have no ``input`` (everything is in the instruction, which keeps examples under 256
    byte tokens with the ``"alpaca"`` template). At most ``num_examples`` records are returned.
    """
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    for word in _WORDS:
        records.append({"instruction": f"Reverse the word: {word}", "output": word[::-1]})
        records.append({"instruction": f"How many letters are in the word '{word}'?", "output": str(len(word))})
        for n in (2, 3, 4):
            records.append({"instruction": f"Repeat the word '{word}' {n} times.", "output": " ".join([word] * n)})
    seen = {r["instruction"] for r in records}

    def add(instruction: str, output: str) -> bool:
        if instruction in seen:
            return False
        seen.add(instruction)
        records.append({"instruction": instruction, "output": output})
        return True

    remaining = max(0, num_examples - len(records))
    targets = {"upper": remaining // 3, "sort": remaining // 3, "add": remaining - 2 * (remaining // 3)}
    for task, count in targets.items():
        made = attempts = 0
        while made < count and attempts < 50 * count:
            attempts += 1
            if task == "upper":
                sentence = " ".join(rng.sample(_WORDS, rng.randint(2, 4)))
                made += add(f"Write in uppercase: {sentence}", sentence.upper())
            elif task == "sort":
                numbers = [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
                made += add(
                    f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}",
                    ", ".join(map(str, sorted(numbers))),
                )
            else:
                a, b = rng.randint(0, 50), rng.randint(0, 50)
                made += add(f"What is {a} plus {b}?", str(a + b))
    rng.shuffle(records)
    return records[:num_examples]


# ---------------------------------------------------------------------------------------------------- tensors


class TokenDataset(Dataset):
    """Rows of ``input_ids`` and shifted ``labels``; items are ``{"input_ids": (seq_len,), "labels": (seq_len,)}``."""

    def __init__(self, input_ids: Tensor, labels: Tensor) -> None:
        if input_ids.shape != labels.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def _rows(
    sequences: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """One ``(input_ids, labels)`` row per token sequence of at most ``seq_len + 1`` tokens, padded."""
    input_rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    for tokens, mask in sequences:
        fill = seq_len + 1 - len(tokens)
        input_rows.append(tokens[:-1] + [pad_id] * fill)
        label_rows.append([t if m else ignore_index for t, m in zip(tokens[1:], mask[1:], strict=True)]
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


# ---------------------------------------------------------------------------------------------------- datamodule


class FinetuneDataModule(L.LightningDataModule):
    """Instruction / chat fine-tuning data with a fixed ``seq_len``, masked prompts and dp-sharded loaders.

    Args:
        path: a JSON-array or JSON Lines file, or a directory of ``*.json``/``*.jsonl`` files. ``None`` (and no
            ``hf_dataset``) uses the built-in example set (:func:`make_default_dataset`), as chat records when
            ``format="chat"``.
        format: ``"auto"`` (per file, from the keys of the first record), ``"alpaca"`` or ``"chat"``.
        tokenizer: ``"byte"`` or a ``tokenizer.json`` / directory containing one (see
            :func:`lightning_tp.data.tokenizers.load_tokenizer`).
        seq_len: length of every row of ``input_ids`` and ``labels``. Examples longer than ``seq_len + 1``
            tokens are truncated (``num_truncated``); those left with no labelled token are dropped
            (``num_dropped``).
        batch_size: rows per batch on each data-parallel rank.
        val_fraction: fraction of the records held out for validation (``0 <= val_fraction < 1``); the split is
            made over records with ``seed``, so it does not depend on ``seq_len`` or ``packing``.
        seed: seed of the train/val split and of the training shuffle (per epoch, through the sampler).
        packing: put several whole examples into each row (best-fit decreasing) instead of one example per row.
            Labels keep their masks; a document boundary is just EOS (attention is not reset).
        template: prompt template name for Alpaca records (:data:`PROMPT_TEMPLATES`).
        skip_malformed: skip (and count in ``num_skipped``, with a warning) malformed records instead of raising
            :class:`DataError`.
        hf_dataset: name or path for :func:`datasets.load_dataset`; excludes ``path``.
        hf_split: split of ``hf_dataset``.
        ignore_index: label of positions without loss (must not be a token id).
        num_workers: ``DataLoader`` worker processes.

    After :meth:`setup`: ``train_dataset``/``val_dataset`` (:class:`TokenDataset`), ``num_train``/``num_val``
    (rows), ``num_train_examples``/``num_val_examples`` (examples in them), ``records`` (validated records in
    source order), ``train_indices``/``val_indices`` (indices into ``records`` of the examples used), and the
    counters ``num_skipped``, ``num_truncated``, ``num_dropped``. ``tokenizer`` is available right away.
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
        _check_int("seq_len", seq_len, minimum=1, fix="use the model's training context, e.g. seq_len=256")
        _check_int("batch_size", batch_size, minimum=1, fix="e.g. batch_size=8")
        _check_int("seed", seed, minimum=None, fix="pass an integer, e.g. seed=0")
        _check_int("num_workers", num_workers, minimum=0, fix="e.g. num_workers=0")
        _check_int("ignore_index", ignore_index, minimum=None, fix="keep the default ignore_index=-100")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
            0.0 <= float(val_fraction) < 1.0
        ):
            raise DataError(f"val_fraction must be in [0, 1), got val_fraction={val_fraction!r}. Fix: e.g."
                            " val_fraction=0.1, or 0 for no validation set.")
        if format not in ("auto", "alpaca", "chat"):
            raise DataError(f"Unknown data format: format={format!r}. Fix: use 'auto', 'alpaca' or 'chat'.")
        self.template = get_template(template)
        if path is not None and hf_dataset is not None:
            raise DataError(f"Both path={path!r} and hf_dataset={hf_dataset!r} were given. Fix: pass only one.")
        if path is not None:
            _data_files(Path(path))  # fail now, not after the trainer has started
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        if 0 <= ignore_index < self.tokenizer.vocab_size:
            raise DataError(
                f"ignore_index={ignore_index} is a token id of tokenizer {self.tokenizer.name!r} (vocab_size"
                f" {self.tokenizer.vocab_size}). Fix: use a negative value, e.g. ignore_index=-100."
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
            self._load_hf()

    def _load_hf(self) -> Any:
        try:
            import datasets
        except ImportError as e:
            raise DataError(
                f"hf_dataset={self.hf_dataset!r} needs the Hugging Face `datasets` package. Fix: pip install"
                " datasets, or export the data to JSON/JSONL and pass path=..."
            ) from e
        try:
            return datasets.load_dataset(self.hf_dataset, split=self.hf_split)
        except Exception as e:
            raise DataError(f"Could not load hf_dataset={self.hf_dataset!r} split hf_split={self.hf_split!r}: {e}"
                            ) from e

    def _sources(self) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
        """``(name, [(location, record), ...])`` per source file / data set."""
        if self.hf_dataset is not None:
            rows = self._load_hf()
            name = f"{self.hf_dataset}[{self.hf_split}]"
            yield name, [(f"{name} row {i}", dict(row)) for i, row in enumerate(rows)]
        elif self.path is not None:
            for file in _data_files(Path(self.path)):
                yield str(file), _read_file(file)
        else:
            records: list[dict[str, Any]] = make_default_dataset()
            if self.format == "chat":
                records = [{"messages": [{"role": "user", "content": r["instruction"]},
                                         {"role": "assistant", "content": r["output"]}]} for r in records]
            yield "<default>", [(f"<default> record {i}", r) for i, r in enumerate(records)]

    def _load_records(self) -> list[Record]:
        records: list[Record] = []
        skipped: list[str] = []
        for name, items in self._sources():
            fmt = self.format
            if fmt == "auto":
                fmt = next((f for f in map(_detect_format, (obj for _, obj in items)) if f is not None), None)
                if fmt is None:
                    if not items:
                        continue
                    location, first = items[0]
                    keys = sorted(first) if isinstance(first, Mapping) else _json_type(first)
                    raise DataError(
                        f"{location}: cannot detect the data format of {name} (first record: {keys}). Alpaca"
                        " records need 'instruction' and 'output', chat records need 'messages'. Fix the records,"
                        " or pass format='alpaca' or format='chat'."
                    )
            for location, obj in items:
                try:
                    records.append(_parse_record(obj, fmt, location))
                except _Malformed as e:
                    if not self.skip_malformed:
                        raise DataError(f"{location}: {e} ({fmt} format). Fix the record, or pass"
                                        " skip_malformed=True to skip malformed records.") from None
                    skipped.append(f"{location}: {e}")
        self.num_skipped = len(skipped)
        self.skipped_reasons = skipped
        if skipped:
            shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            rank_zero_warn(f"Skipped {len(skipped)} malformed record(s) (skip_malformed=True): {shown}")
        return records

    # ------------------------------------------------------------------ building

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, tokenize, split and pack the data into tensors (once; later calls do nothing)."""
        if self.train_dataset is not None:
            return
        records = self._load_records()
        if not records:
            raise DataError(f"No usable records in {self._describe_source()}"
                            f"{f' ({self.num_skipped} malformed skipped)' if self.num_skipped else ''}.")
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
                f"{truncated} of {n} examples were longer than seq_len + 1 = {limit} tokens and were truncated;"
                f" {dropped} of them lost their whole response and were dropped. Fix: raise seq_len or shorten"
                " the examples."
            )
        self.train_indices = [i for i in split["train"] if i in encoded]
        self.val_indices = [i for i in split["val"] if i in encoded]
        if not self.train_indices:
            shortest = min(len(record.encode(self.tokenizer, self.template)[0]) for record in records)
            raise DataError(
                f"No training examples left out of {n} records from {self._describe_source()} (seq_len="
                f"{self.seq_len}: {dropped} dropped because their response did not fit, the shortest example has"
                f" {shortest} tokens; {len(split['val'])} held out for validation). Fix: raise seq_len (e.g."
                f" seq_len={max(2 * self.seq_len, shortest + 32)}), use a shorter prompt template (e.g."
                " template='plain'), or lower val_fraction."
            )
        self.train_dataset = self._build([encoded[i] for i in self.train_indices])
        self.val_dataset = self._build([encoded[i] for i in self.val_indices])
        self.num_train, self.num_val = len(self.train_dataset), len(self.val_dataset)
        self.num_train_examples, self.num_val_examples = len(self.train_indices), len(self.val_indices)

    def _build(self, examples: list[tuple[list[int], list[bool]]]) -> TokenDataset:
        pad_id = self.tokenizer.pad_id
        if self.packing:
            bins = _pack([len(tokens) for tokens, _ in examples], self.seq_len + 1)
            examples = [
                ([t for i in items for t in examples[i][0]], [m for i in items for m in examples[i][1]])
                for items in bins
            ]
        return TokenDataset(*_rows(examples, self.seq_len, pad_id, self.ignore_index))

    def _describe_source(self) -> str:
        if self.hf_dataset is not None:
            return f"hf_dataset={self.hf_dataset!r} split {self.hf_split!r}"
        return f"path={self.path!r}" if self.path is not None else "the built-in data set"

    # ------------------------------------------------------------------ loaders

    def _replicas(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` over the data-parallel ranks of the attached trainer; ``(1, 0)`` without."""
        trainer = getattr(self, "trainer", None)
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs:
            return 1, 0
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _loader(self, dataset: TokenDataset, train: bool) -> DataLoader:
        num_replicas, rank = self._replicas()
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=train, seed=self.seed, drop_last=train
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Full training batches only (a tiny last batch is a noisy step), unless there is not even one.
            drop_last=train and len(sampler) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Training rows, shuffled per epoch with ``seed`` and sharded over the data-parallel ranks.

        Every rank gets the same number of rows (the sampler drops the remainder) and only full batches, unless a
        rank has fewer rows than ``batch_size``.
        """
        self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation rows in order, sharded over the data-parallel ranks (empty when ``val_fraction=0``)."""
        self.setup("validate")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, train=False)


def _check_int(name: str, value: Any, minimum: int | None, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise DataError(f"{name} must be {need}, got {name}={value!r}. Fix: {fix}.")

