"""Hugging Face interoperability, the reading side; the public names of the writing side too.

* :func:`load_hf_checkpoint` reads a Hugging Face checkpoint directory into a :class:`Llama`, plain
  or sharded (tensor parallel and/or FSDP2 DTensors): each rank reads only its own slice of each
  tensor. Everything is validated before the first parameter is written (:func:`check_hf_checkpoint`
  runs the same checks on a meta-device model). Only safetensors are read (never pickle).
* :func:`llama_from_hf` builds the model a directory's ``config.json`` describes.
* :func:`import_hf` (``lightning-tp import``) turns a Hugging Face directory into one of this
  project's sharded checkpoints, written with :func:`.layout.write_checkpoint`.
* From :mod:`.hf_export`: :func:`export_hf`, :func:`consolidated_state_dict`,
  :func:`export_checkpoint` (``lightning-tp export``) and :func:`strip_prefix`; from
  :mod:`.hf_config`: :func:`config_from_hf` and :func:`config_to_hf`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_tp._compat import compute_local_shape_and_global_offset
from lightning_tp.checkpoint.hf_config import (
    CONFIG_FILE,
    INDEX_FILE,
    NUMERIC_FIELDS,
    SHAPE_FIELDS,
    SINGLE_FILE,
    config_from_hf,
    config_to_hf,
    key_problems,
    read_json,
)
from lightning_tp.checkpoint.hf_export import (
    consolidated_state_dict,
    export_checkpoint,
    export_hf,
    strip_prefix,
)
from lightning_tp.checkpoint.layout import write_checkpoint
from lightning_tp.errors import CheckpointError
from lightning_tp.models.config import LlamaConfig
from lightning_tp.models.llama import Llama

__all__ = ["NUMERIC_FIELDS", "SHAPE_FIELDS", "check_hf_checkpoint", "config_from_hf",
           "config_to_hf", "consolidated_state_dict", "export_checkpoint", "export_hf", "import_hf",
           "llama_from_hf", "load_hf_checkpoint", "strip_prefix"]

# Buffers some old conversions saved; recomputed from the config.
_IGNORED = ("rotary_emb.inv_freq",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def llama_from_hf(path: str | Path, device: torch.device | str = "meta") -> Llama:
    """A :class:`Llama` built from ``path/config.json``: on ``meta`` (shard it, materialise it, then
    call :func:`load_hf_checkpoint`), or on a real device with the checkpoint's weights loaded."""
    path = Path(path)
    with torch.device(device):
        model = Llama(config_from_hf(read_json(path / CONFIG_FILE)))
    if torch.device(device).type != "meta":
        model.init_weights()  # RoPE tables and tied weights; the parameters are overwritten next
        load_hf_checkpoint(model, path)
    return model


def _weight_file_names(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory, and its index's ``weight_map`` if any."""
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory; pass a Hugging Face checkpoint"
                              " directory.")
    if (path / INDEX_FILE).is_file():
        weight_map = read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{str(path / INDEX_FILE)!r} has no `weight_map`.")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{INDEX_FILE} in {str(path)!r} lists shard file(s) that do not"
                                  f" exist: {absent}. The download or copy is incomplete.")
        return files, weight_map
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    files = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{str(path)!r} holds only {pickles}: only safetensors checkpoints"
                              " are supported (pickle files can run code when loaded). Convert them"
                              " with transformers: `model.save_pretrained(dir,"
                              " safe_serialization=True)`.")
    raise CheckpointError(f"No {SINGLE_FILE} or {INDEX_FILE} in {str(path)!r}.")


def _weight_files(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (file name, shape)}`` of a checkpoint directory; each file must open."""
    from safetensors import safe_open

    files, weight_map = _weight_file_names(path)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(path / file), "pt") as handle:
                for name in handle.keys():
                    if name in found:
                        raise CheckpointError(f"Tensor {name!r} is in both {found[name][0]} and"
                                              f" {file}.")
                    found[name] = (file, tuple(handle.get_slice(name).get_shape()))
        except Exception as e:  # safetensors raises SafetensorError (truncated, corrupt) or OSError
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"Could not read {file} in {str(path)!r} (truncated or corrupt?):"
                                  f" {e}. Fix: copy or download the checkpoint again.") from e
    for name, file in (weight_map or {}).items():
        if found.get(name, (file,))[0] != file:
            raise CheckpointError(f"{INDEX_FILE} maps {name!r} to {file}, but it is in"
                                  f" {found[name][0]}.")
        if name not in found:
            raise CheckpointError(f"{INDEX_FILE} maps {name!r} to {file}, which does not contain"
                                  " it.")
    return {k: v for k, v in found.items() if not k.endswith(_IGNORED)}


def _local_index(param: Tensor) -> tuple[Tensor, tuple[slice, ...]]:
    """The tensor to write into, and the block of the full tensor it holds (global indices)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, tuple(slice(0, n) for n in param.shape)
    # Looked up in torch when called (not through lightning_tp._compat, which binds it at import) so
    # that a test can count the calls.

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    return param.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


_FIT_HINT = (" Fix: load it into a model built from its own config.json (llama_from_hf, or a"
             " recipe's checkpoint=DIR), or use a checkpoint whose config.json and weights belong"
             " to this model.")


def _cannot_load(path: str | Path, model: nn.Module, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"Cannot load {str(path)!r} into {type(model).__name__}: "
                           + "; ".join(problems) + "." + _FIT_HINT)


def check_hf_checkpoint(model: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Raise :class:`CheckpointError` unless ``path`` can fill the :class:`Llama` at ``prefix`` in
    ``model``: config, tensor names and shapes, readable safetensors files. Reads only
    ``config.json`` and the safetensors headers, and ``model`` may be on the meta device: the
    launching process runs it before any rank starts."""
    problems = _fit(model, path, prefix)[3]
    if problems:
        raise _cannot_load(path, model, problems)


def _fit(model: nn.Module, path: str | Path, prefix: str
         ) -> tuple[dict[str, Tensor], dict[str, str], dict[str, tuple[str, tuple[int, ...]]],
                    list[str]]:
    """``(parameters, parameter → tensor name in the files, the files' tensors, problems)`` for
    loading ``path`` into the Llama at ``prefix``; the problems are those that hold whatever device
    the parameters are on."""
    path = Path(path)
    prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
    params = {n[len(prefix):]: p for n, p in model.named_parameters(remove_duplicate=False)
              if n.startswith(prefix)}
    if not params:
        raise CheckpointError(f"{type(model).__name__} has no parameters under prefix={prefix!r}.")
    llama = model.get_submodule(prefix[:-1]) if prefix else model
    config = getattr(llama, "config", None)
    problems = []
    hf = config_from_hf(read_json(path / CONFIG_FILE))
    if isinstance(config, LlamaConfig):
        ours, theirs = dataclasses.asdict(config), dataclasses.asdict(hf)
        ours["head_dim"], theirs["head_dim"] = config.resolved_head_dim, hf.resolved_head_dim
        diffs = [f"{f}: model {ours[f]!r} vs checkpoint {theirs[f]!r}"
                 for f in (*SHAPE_FIELDS, "head_dim", *NUMERIC_FIELDS) if ours[f] != theirs[f]]
        if diffs:
            problems.append("config.json does not match the model: " + "; ".join(diffs))
    files = _weight_files(path)
    source = {name: name for name in params}  # parameter → tensor name in the files
    tied = bool(getattr(config, "tie_word_embeddings", False))  # also a transformers config
    if tied and "lm_head.weight" in params:
        if params["lm_head.weight"] is params.get("model.embed_tokens.weight"):
            del source["lm_head.weight"]  # written through the embedding
        else:
            source["lm_head.weight"] = "model.embed_tokens.weight"
    stored = set(files) - ({"lm_head.weight"} if tied else set())
    problems += key_problems(set(source.values()), stored, "the checkpoint")
    problems += [f"{name}: model {tuple(params[name].shape)} vs checkpoint {files[src][1]}"
                 for name, src in sorted(source.items())
                 if src in files and tuple(params[name].shape) != files[src][1]]
    return params, source, files, problems


def load_hf_checkpoint(model: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load the Hugging Face checkpoint directory ``path`` into the :class:`Llama` at ``prefix`` in
    ``model`` (``""``: ``model`` is the Llama; ``"model."``: a
    :class:`~lightning_tp.CausalLMModule`).

    Parameters may be plain tensors or DTensors (tensor parallel, FSDP2): each rank reads only its
    own slice of each tensor from disk. Call it on every rank after the model has been sharded and
    materialised. Raises :class:`CheckpointError`, before writing any parameter, for a config, key
    or shape that does not fit.
    """
    path = Path(path)
    params, source, files, problems = _fit(model, path, prefix)
    if any(p.is_meta for p in params.values()):
        problems.append("the model is on the meta device; materialise it (to_empty + init_weights,"
                        " or let the strategy set it up) before loading")
    # (local tensor, its block of the full one)
    blocks = {name: _local_index(params[name]) for name in source}
    problems += [f"{name}: the local shard {tuple(local.shape)} is not one block of the full tensor"
                 " (placements"
                 f" {params[name].placements})" for name, (local, index) in blocks.items()
                 if tuple(local.shape) != tuple(i.stop - i.start for i in index)]
    if problems:
        raise _cannot_load(path, model, problems)
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, src in sorted(source.items()):
        by_file.setdefault(files[src][0], []).append((name, src))
    # One file open at a time: its memory map (and the page cache it pins in this process) is
    # released before the next; only the slice being copied is ever materialised.
    with torch.no_grad():
        for file, entries in by_file.items():
            with safe_open(str(path / file), "pt") as handle:
                for name, src in entries:
                    local, index = blocks[name]
                    local.copy_(handle.get_slice(src)[index])


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> LlamaConfig:
    """Write the Hugging Face Llama directory ``hf_dir`` as a sharded checkpoint ``out_dir`` that
    ``finetune checkpoint=OUT_DIR`` (or :func:`~lightning_tp.checkpoint.load_weights`) starts from,
    in this process, without a process group. Returns the model's config.

    The weights are keyed as a :class:`~lightning_tp.CausalLMModule`'s (its Llama is ``model``);
    ``meta.pt`` holds the model's hyper-parameters as Lightning saves them, so that
    :func:`export_checkpoint` reads the config back. Needs memory for the whole model.

    Raises:
        CheckpointError: ``out_dir`` exists and is not empty, or ``hf_dir`` is not a Llama
        checkpoint.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{str(out_dir)!r} exists and is not empty.")
    model = llama_from_hf(hf_dir, device="cpu")
    write_checkpoint({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
                     {"hyper_parameters": {"model": dataclasses.asdict(model.config)}}, out_dir)
    return model.config
