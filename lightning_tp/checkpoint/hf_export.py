"""Hugging Face interoperability, the writing side: our checkpoints → Hugging Face directories.

* :func:`export_hf` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained``
  loads, all or nothing (:func:`.layout.atomic_write`).
* :func:`consolidated_state_dict` turns one of this project's sharded checkpoints into full tensors
  in one process, without a process group (:func:`.safe_reading.load_full`), ready for
  :func:`export_hf`.
* :func:`export_checkpoint` (``lightning-tp export``) does both, with the model config and tokenizer
  the run's ``meta.pt`` records.

The public names are also importable from :mod:`.hf`. Imports :mod:`.hf_config`, :mod:`.layout`,
:mod:`.safe_reading`, :mod:`lightning_tp.models` and (when a tokenizer is exported)
:mod:`lightning_tp.data.tokenizers`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint import CheckpointException

from lightning_tp.checkpoint.hf_config import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    config_to_hf,
    key_problems,
    model_config,
)
from lightning_tp.checkpoint.layout import META_FILE, atomic_write
from lightning_tp.checkpoint.safe_reading import load_full, read_checkpoint_metadata, read_meta
from lightning_tp.errors import CheckpointError
from lightning_tp.models.config import LlamaConfig, get_config
from lightning_tp.models.llama import Llama

__all__ = ["Export", "consolidated_state_dict", "export_checkpoint", "export_hf", "strip_prefix"]


def strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``sd`` whose key starts with ``prefix``, with it removed (e.g. ``"model."``
    for the state dict of a :class:`~lightning_tp.CausalLMModule`)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _export_problems(state_dict: dict[str, Tensor], expected: dict[str, tuple[int, ...]]
                     ) -> list[str]:
    """Why ``state_dict`` (``lm_head.weight`` already left out when tied) does not hold full tensors
    of the names and shapes ``expected``."""
    from torch.distributed.tensor import DTensor

    problems = key_problems(set(expected), set(state_dict), "the state dict")
    for k, shape in expected.items():
        t = state_dict.get(k)
        if isinstance(t, DTensor) or (isinstance(t, Tensor) and t.is_meta):
            problems.append(f"{k} is a {'DTensor' if isinstance(t, DTensor) else 'meta tensor'};"
                            " pass full tensors (consolidated_state_dict, or"
                            " DTensor.full_tensor())")
        elif t is not None and tuple(t.shape) != shape:
            problems.append(f"{k}: {tuple(t.shape)} vs {shape} for the config")
    return problems


def _shards(tensors: dict[str, Tensor], max_shard_bytes: int) -> dict[str, dict[str, Tensor]]:
    """``{file name: tensors}``: consecutive tensors in files of at most ``max_shard_bytes`` each
    (one tensor larger than that gets a file of its own)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard
            for i, shard in enumerate(shards)}


def export_hf(state_dict: dict[str, Tensor], config: LlamaConfig, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 2 * 1024**3, *,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> list[Path]:
    """Write a Hugging Face checkpoint directory for a :class:`Llama` state dict (plain tensors, HF
    names).

    ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` shards of at
    most ``max_shard_bytes`` each and ``model.safetensors.index.json``), and the tokenizer files of
    ``tokenizer_dir``. ``lm_head.weight`` is left out when tied. ``dtype`` casts every tensor. The
    directory is written beside ``out_dir`` and renamed into place at the end. Returns the files
    written.
    """
    from torch.distributed.tensor import DTensor

    out = Path(out_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}
    problems = []
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        head, embed = state_dict.get("lm_head.weight"), state_dict.get("model.embed_tokens.weight")
        plain = all(isinstance(t, Tensor) and not isinstance(t, DTensor) and not t.is_meta
                    for t in (head, embed))
        if plain and head is not embed and not torch.equal(head, embed):
            problems.append("the config ties lm_head.weight to model.embed_tokens.weight, but they"
                            " differ")
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    problems += _export_problems(state_dict, expected)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        problems.append(f"{str(out)!r} exists and is not empty (overwrite=True / --overwrite"
                        " replaces it)")
    files = []
    if tokenizer_dir is not None:
        files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES
                 if (Path(tokenizer_dir) / f).is_file()]
        if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
            problems.append(f"no tokenizer.json in tokenizer_dir={str(tokenizer_dir)!r}")
    if problems:
        raise CheckpointError(f"Cannot export to {str(out)!r}: " + "; ".join(problems) + ".")
    hf_config = config_to_hf(config, dtype or state_dict["model.embed_tokens.weight"].dtype)
    if any(f.name == "tokenizer.json" for f in files):
        from lightning_tp.data.tokenizers import HFTokenizer, TokenizerError, check_tokenizer

        try:
            check_tokenizer(tok := HFTokenizer(tokenizer_dir), config.vocab_size)
        except TokenizerError as e:
            raise CheckpointError(f"Cannot export the tokenizer: {e}") from e
        hf_config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)

    tensors, storages = {}, set()
    for k in expected:  # HF module order
        t = state_dict[k].detach().to(device="cpu", dtype=dtype or state_dict[k].dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in storages else t  # safetensors refuses shared memory
        storages.add(ptr)
    shards = _shards(tensors, max_shard_bytes)

    from safetensors.torch import save_file

    with atomic_write(out, directory=True) as staged:
        (staged / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        for name, shard in shards.items():
            save_file(shard, str(staged / name), metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for name, shard in shards.items() for k in shard}}
            (staged / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for f in files:
            shutil.copyfile(f, staged / f.name)
    return sorted(out.iterdir())


def consolidated_state_dict(checkpoint_dir: str | Path,
                            prefix: str = "model.") -> dict[str, Tensor]:
    """Full plain tensors of the weights in one of this project's sharded (DCP) checkpoints, read in
    a single process without a process group. Keys lose ``"state_dict." + prefix``:
    ``"model.embed_tokens.weight"``.

    Only tensor entries are read (no byte entry is unpickled), through the safe reader of
    :mod:`.safe_reading`. Needs memory for the whole model; tensors keep the checkpoint's dtype.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(checkpoint_dir)
    metadata = read_checkpoint_metadata(path, complete=False)  # meta.pt is not needed
    head = "state_dict." + prefix
    keys = [k for k, v in metadata.state_dict_metadata.items()
            if k.startswith(head) and isinstance(v, TensorStorageMetadata)]
    if not keys:
        seen = sorted({".".join(k.split(".")[:2]) for k in metadata.state_dict_metadata})
        raise CheckpointError(f"No tensors under {head!r} in {str(path)!r}; it holds {seen}. Check"
                              " `prefix`.")
    try:
        state = load_full(path, keys=keys)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"Could not read the weights in {str(path)!r}: {e}") from e
    return strip_prefix(state["state_dict"], prefix)


@dataclasses.dataclass(frozen=True)
class Export:
    """What :func:`export_checkpoint` wrote."""

    config: LlamaConfig
    files: list[Path]
    tokenizer: str | None
    """the tokenizer directory copied, if any"""


def _saved_meta(checkpoint: Path, model: str | None) -> dict[str, Any]:
    """The checkpoint's ``meta.pt``, read without unpickling code; ``{}`` if it is absent, or if it
    cannot be read safely and ``model`` names the config instead."""
    if not (checkpoint / META_FILE).is_file():
        return {}
    try:
        return read_meta(checkpoint, weights_only=True)
    except Exception as e:
        if model is None:
            raise CheckpointError(f"{str(checkpoint / META_FILE)!r} cannot be read safely"
                                  f" (weights_only): {e}\nPass the model with --model"
                                  " PRESET_OR_CONFIG_JSON.") from e
        return {}


def _config(checkpoint: Path, meta: dict[str, Any], model: str | None) -> LlamaConfig:
    """The model config: the run's hyper-parameters in ``meta``, or ``model`` (a preset name or a
    config JSON), which must then agree with them."""
    saved = (meta.get("hyper_parameters") or {}).get("model")
    config = None
    if saved is not None:
        config = get_config(saved) if isinstance(saved, str) else LlamaConfig(**saved)
    if model is not None:
        given = model_config(model)
        same = config is None or dataclasses.replace(given, head_dim=given.resolved_head_dim) == \
            dataclasses.replace(config, head_dim=config.resolved_head_dim)
        if not same:
            raise CheckpointError(f"--model {model!r} gives {given}, but the checkpoint was trained"
                                  f" with {config}. Leave --model out to use the checkpoint's.")
        config = given
    if config is None:
        raise CheckpointError(f"{str(checkpoint)!r} has no {META_FILE} with the model's"
                              " hyper-parameters; pass --model PRESET_OR_CONFIG_JSON.")
    return config


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, model: str | None = None,
                      tokenizer: str | None = None, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> Export:
    """Export the sharded checkpoint ``checkpoint`` of a training run as the Hugging Face directory
    ``out_dir`` (:func:`consolidated_state_dict`, then :func:`export_hf`).

    The model config is the one the run's ``meta.pt`` records, or ``model`` (a preset name, a
    Hugging Face ``config.json`` or a JSON file of :class:`LlamaConfig` fields), which must agree
    with it. The tokenizer copied is ``tokenizer``, or by default the file or directory the run was
    trained with, when it still exists.

    Raises:
        CheckpointError: no config, a ``model`` that disagrees with the run's, or an export problem.
        KeyError, TypeError, ValueError: ``model`` names no preset or holds invalid fields.
    """
    checkpoint = Path(checkpoint)
    meta = _saved_meta(checkpoint, model)
    config = _config(checkpoint, meta, model)
    if tokenizer is None:  # the tokenizer the run was trained with, when it is a file or directory
        trained = (meta.get("datamodule_hyper_parameters") or {}).get("tokenizer")
        if isinstance(trained, str) and Path(trained).exists():
            tokenizer = trained if Path(trained).is_dir() else str(Path(trained).parent)
    written = export_hf(consolidated_state_dict(checkpoint), config, out_dir,
                        tokenizer_dir=tokenizer, max_shard_bytes=max_shard_bytes,
                        overwrite=overwrite, dtype=dtype)
    return Export(config, written, tokenizer)
