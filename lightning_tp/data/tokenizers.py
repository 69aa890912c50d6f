"""Tokenizers: a built-in byte-level one (no files), and Hugging Face ``tokenizer.json`` files.

Every tokenizer exposes ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``encode`` and
``decode``, and a ``name`` that identifies it in data caches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

from lightning_tp.errors import LightningTPError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "TokenizerError", "check_tokenizer",
           "load_tokenizer"]


class TokenizerError(LightningTPError):
    """A tokenizer is missing, unreadable, or does not fit the model."""


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0–255, then BOS=256, EOS=257, PAD=258. Needs no files; fits any model with vocab
    ≥ 259."""

    name = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` package), with special tokens
    taken from ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it when present."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"No tokenizer.json at {str(path)!r}. Pass `tokenizer=byte` for"
                                 " the built-in byte tokenizer, or a tokenizer.json file or a"
                                 " directory containing one.")
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as e:  # pragma: no cover - tokenizers ships with transformers
            raise TokenizerError("Reading tokenizer.json needs the `tokenizers` package: pip"
                                 " install tokenizers") from e
        try:
            self._tok = _Tokenizer.from_file(str(file))
        except Exception as e:
            raise TokenizerError(f"Could not read tokenizer {str(file)!r}: {e}. Fix: pass a"
                                 " tokenizer.json that the `tokenizers` package wrote"
                                 " (tokenizer.save), or tokenizer=byte.") from e
        self.name = "hf-" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = self._special_tokens(file.parent)
        self.bos_id = self._id(special.get("bos_token"))
        eos = self._id(special.get("eos_token"))
        if eos is None:
            raise TokenizerError(f"Tokenizer {str(file)!r} defines no EOS token (eos_token in"
                                 " tokenizer_config.json); documents cannot be separated. Fix: name"
                                 " it in tokenizer_config.json beside it,"
                                 ' e.g. {"eos_token": "</s>"}.')
        self.eos_id = eos
        pad = self._id(special.get("pad_token"))
        self.pad_id = pad if pad is not None else eos

    @staticmethod
    def _special_tokens(folder: Path) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = folder / name
            if file.is_file():
                for key, value in json.loads(file.read_text()).items():
                    if key in ("bos_token", "eos_token", "pad_token") and value:
                        found.setdefault(key,
                                         value["content"] if isinstance(value, dict) else value)
        return found

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return (([self.bos_id] if bos and self.bos_id is not None else []) + ids
                + ([self.eos_id] if eos else []))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec: str | Path | None = "byte") -> Tokenizer:
    """``"byte"`` (or ``None``) → :class:`ByteTokenizer`; a ``tokenizer.json`` or a directory with
    one (e.g. a checkpoint directory) → :class:`HFTokenizer`."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def check_tokenizer(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise if the tokenizer can produce ids the model's embedding does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"Tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's"
            f" vocab_size is {model_vocab_size}. Fix: use a model with vocab_size >="
            f" {tokenizer.vocab_size} (e.g. model.vocab_size={tokenizer.vocab_size}) or a smaller"
            " tokenizer."
        )
