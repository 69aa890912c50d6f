"""Fine-tuning records: reading JSON / JSON Lines files and validating Alpaca and chat records.

Alpaca records are ``{"instruction": str, "input": str (optional), "output": str}``; chat records
are ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``. Every
problem is reported with its location (``file:line``, a JSON array index, a data set row);
:func:`collect_records` raises it as :class:`~lightning_tp.errors.DataError` or, with
``skip_malformed=True``, skips and lists it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tp.data.instructions import (
    PromptTemplate,
    encode_chat,
    encode_instruction,
    make_default_dataset,
)
from lightning_tp.data.tokenizers import Tokenizer
from lightning_tp.errors import DataError

__all__ = [
    "CHAT_ROLES",
    "Record",
    "collect_records",
    "data_files",
    "iter_sources",
    "load_hf_dataset",
    "parse_record",
    "read_file",
]

#: Roles allowed in chat records.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One validated record. ``messages`` is set for chat records,
    ``instruction``/``input``/``output`` otherwise; ``source`` says where it came from
    (``file:line``, a JSON array index, a data set row)."""

    source: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: tuple[tuple[str, str], ...] | None = None

    def encode(self, tokenizer: Tokenizer,
               template: PromptTemplate) -> tuple[list[int], list[bool]]:
        """``(tokens, loss_mask)`` of this record (see :func:`encode_instruction` and
        :func:`encode_chat`)."""
        if self.messages is not None:
            return encode_chat(tokenizer, self.messages)
        return encode_instruction(tokenizer, template.render(self.instruction, self.input),
                                  self.output)


class _Malformed(Exception):
    """A record-level problem: raised as :class:`DataError`, or skipped with
    ``skip_malformed=True``."""


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


def parse_record(obj: Any, fmt: str, source: str) -> Record:
    """Validate one decoded record of format ``fmt`` (``"alpaca"`` or ``"chat"``); raise
    :class:`_Malformed`."""
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
        raise _Malformed("missing 'messages' (a chat record needs a list of {'role', 'content'}"
                         " objects)")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise _Malformed(f"'messages' must be a non-empty array, got {_json_type(messages)}")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _Malformed(f"messages[{i}] must be an object with 'role' and 'content', got"
                             f" {_json_type(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise _Malformed(f"messages[{i}]: unknown role {role!r} (expected one of"
                             f" {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str):
            raise _Malformed(f"messages[{i}]: 'content' must be a string, got"
                             f" {_json_type(content)}")
        if role == "assistant" and not content.strip():
            raise _Malformed(f"messages[{i}]: empty assistant content")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise _Malformed("no assistant turn in 'messages' (nothing to learn)")
    return Record(source=source, messages=tuple(turns))


def read_file(file: Path) -> list[tuple[str, Any]]:
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
                    f"{file}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}). A file starting"
                    " with '[' must be one JSON array of records; fix the JSON, or write one record"
                    " per line (JSON Lines)."
                ) from e
            whole = None  # a .json file holding JSON Lines
        if whole is not None and not isinstance(whole, list):
            raise DataError(
                f"{file}: the file holds a single JSON {_json_type(whole).split()[-1]}; expected a"
                " JSON array of records or JSON Lines (one record per line). Fix: wrap the records"
                " in [...] or write JSONL."
            )
    if isinstance(whole, list):
        return [(f"{file}: record {i} of the JSON array", obj) for i, obj in enumerate(whole)]
    items: list[tuple[str, Any]] = []
    # not splitlines(): JSON may hold a raw U+2028
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{file}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            items.append((f"{file}:{lineno}",
                          _Malformed(f"invalid JSON ({e.msg}, column {e.colno})")))
    return items


def data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise DataError(f"No *.json or *.jsonl files in path={str(path)!r}. Fix: point `path`"
                            " at a data file or a directory containing some.")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"Data path does not exist: path={str(path)!r}. Fix: pass an existing"
                    " JSON/JSONL file or directory, or path=None for the built-in example data"
                    " set.")


def collect_records(
    sources: Iterable[tuple[str, list[tuple[str, Any]]]], fmt: str, skip_malformed: bool
) -> tuple[list[Record], list[str]]:
    """Validate the records of ``(name, [(location, decoded record), ...])`` sources, in order.

    ``fmt="auto"`` detects each source's format from the first record with ``messages`` (chat) or
    ``instruction`` (Alpaca); an empty source is skipped. Returns the records and, with
    ``skip_malformed``, the ``"location: reason"`` of every record skipped.

    Raises:
        DataError: a source whose format cannot be detected, or (without ``skip_malformed``) a
            malformed record, naming its ``file:line`` (or array index / data set row).
    """
    records: list[Record] = []
    skipped: list[str] = []
    for name, items in sources:
        source_fmt = fmt
        if source_fmt == "auto":
            source_fmt = next((f for f in map(_detect_format, (obj for _, obj in items))
                               if f is not None), None)
            if source_fmt is None:
                if not items:
                    continue
                location, first = items[0]
                keys = sorted(first) if isinstance(first, Mapping) else _json_type(first)
                raise DataError(
                    f"{location}: cannot detect the data format of {name} (first record: {keys})."
                    " Alpaca records need 'instruction' and 'output', chat records need 'messages'."
                    " Fix the records, or pass format='alpaca' or format='chat'."
                )
        for location, obj in items:
            try:
                records.append(parse_record(obj, source_fmt, location))
            except _Malformed as e:
                if not skip_malformed:
                    raise DataError(f"{location}: {e} ({source_fmt} format). Fix the record, or"
                                    " pass skip_malformed=True to skip malformed"
                                    " records.") from None
                skipped.append(f"{location}: {e}")
    return records, skipped


def load_hf_dataset(name: str, split: str) -> Any:
    """Split ``split`` of the Hugging Face data set ``name`` (:func:`datasets.load_dataset`; needs
    ``datasets``)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"hf_dataset={name!r} needs the Hugging Face `datasets` package. Fix: pip install"
            " datasets, or export the data to JSON/JSONL and pass path=..."
        ) from e
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"Could not load hf_dataset={name!r} split hf_split={split!r}: {e}") from e


def iter_sources(
    path: str | None, hf_dataset: str | None, hf_split: str, chat: bool = False
) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """``(name, [(location, decoded record), ...])`` per source: the rows of ``hf_dataset``, else
    each data file of ``path``, else the built-in set
    (:func:`~lightning_tp.data.instructions.make_default_dataset`), given as one user turn and one
    assistant turn per record when ``chat``."""
    if hf_dataset is not None:
        rows = load_hf_dataset(hf_dataset, hf_split)
        name = f"{hf_dataset}[{hf_split}]"
        yield name, [(f"{name} row {i}", dict(row)) for i, row in enumerate(rows)]
    elif path is not None:
        for file in data_files(Path(path)):
            yield str(file), read_file(file)
    else:
        records: list[dict[str, Any]] = make_default_dataset()
        if chat:
            records = [{"messages": [{"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": r["output"]}]}
                       for r in records]
        yield "<default>", [(f"<default> record {i}", r) for i, r in enumerate(records)]
