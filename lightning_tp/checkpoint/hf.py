"""Hugging Face interoperability: ``config.json`` ↔ :class:`LlamaConfig`, safetensors checkpoints in and out.

* :func:`load_hf_checkpoint` reads a Hugging Face checkpoint directory into a :class:`Llama`, plain or sharded
  (tensor parallel and/or FSDP2 DTensors): each rank reads only its own slice of each tensor. Everything is
  validated before the first parameter is written. Only safetensors are read (never pickle).
* :func:`export_hf` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
* :func:`consolidated_state_dict` turns one of this project's sharded checkpoints into full tensors in one
  process, without a process group, ready for :func:`export_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tp.errors import CheckpointError
from lightning_tp.models.config import LlamaConfig
from lightning_tp.models.llama import Llama

__all__ = ["check_hf_checkpoint", "config_from_hf", "config_to_hf", "consolidated_state_dict", "export_hf",
           "llama_from_hf", "load_hf_checkpoint", "strip_prefix"]

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")
# Compared by `load_hf_checkpoint` besides the shapes: they change the numbers without changing any shape.
NUMERIC_FIELDS = ("rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings")
_ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old conversions saved; recomputed from the config
_INDEX = "model.safetensors.index.json"


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(file)!r} does not exist. Fix: pass a Hugging Face model directory (config.json"
                              " beside *.safetensors files).") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Could not read {str(file)!r} as JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(file)!r} must hold a JSON object, not {type(data).__name__}.")
    return data


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """:class:`LlamaConfig` of a Hugging Face Llama 2/3/3.1/3.2 ``config.json`` (transformers 4 or 5 style)."""
    if d.get("model_type") != "llama":
        raise CheckpointError(f"config.json has model_type={d.get('model_type')!r}; only Llama checkpoints"
                              " (model_type 'llama': Llama 2, 3, 3.1, 3.2) are supported. Fix: pass a Llama-family"
                              " checkpoint directory.")
    if d.get("num_key_value_heads") is None and "num_attention_heads" in d:  # configs from before GQA
        d = {**d, "num_key_value_heads": d["num_attention_heads"]}
    missing = [f for f in SHAPE_FIELDS if f not in d]
    unsupported = [f"{k}={d[k]!r}" for k in ("attention_bias", "mlp_bias") if d.get(k)]
    if d.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={d['hidden_act']!r}")
    if missing or unsupported:
        raise CheckpointError(f"Unsupported Llama config.json: missing {missing}, unsupported {unsupported}.")
    # transformers 5 keeps rope_theta and the scaling in `rope_parameters`; 4 in `rope_theta` + `rope_scaling`.
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    scaling = rope or d.get("rope_scaling") or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        elif kind == "llama3":
            scaling = {**{k: scaling[k] for k in _ROPE_KEYS if k in scaling}, "rope_type": "llama3"}
        else:
            raise CheckpointError(f"config.json has RoPE scaling type {kind!r}; only 'llama3' (Llama 3.1/3.2) and"
                                  " plain RoPE are supported.")
    names = {f.name for f in dataclasses.fields(LlamaConfig)} - {"rope_theta", "rope_scaling"}
    # Defaults of transformers' LlamaConfig for the optional fields (ours are those of the debug preset).
    fields = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
    fields.update({k: v for k, v in d.items() if k in names and v is not None})
    try:
        return LlamaConfig(**fields, rope_theta=float(theta), rope_scaling=scaling)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json does not describe a valid Llama: {e}") from e


def config_to_hf(c: LlamaConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``c``, readable by transformers 4 and 5 (both RoPE spellings)."""
    d: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    d.update({f: getattr(c, f) for f in SHAPE_FIELDS})
    if c.head_dim is not None:
        d["head_dim"] = c.head_dim
    d.update(max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
             initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings, hidden_act="silu",
             attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1, use_cache=True,
             rope_theta=c.rope_theta, rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
             rope_parameters={"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta})
    if dtype is not None:
        d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    return d


def llama_from_hf(path: str | Path, device: torch.device | str = "meta") -> Llama:
    """A :class:`Llama` built from ``path/config.json``: on ``meta`` (shard it, materialise it, then call
    :func:`load_hf_checkpoint`), or on a real device with the checkpoint's weights loaded."""
    path = Path(path)
    with torch.device(device):
        model = Llama(config_from_hf(_read_json(path / "config.json")))
    if torch.device(device).type != "meta":
        model.init_weights()  # RoPE tables and tied weights; the parameters are overwritten next
        load_hf_checkpoint(model, path)
    return model


def _weight_files(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (file name, shape)}`` of a checkpoint directory; every file is checked to open."""
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory; pass a Hugging Face checkpoint directory.")
    weight_map: dict[str, str] | None = None
    if (path / _INDEX).is_file():
        weight_map = _read_json(path / _INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{str(path / _INDEX)!r} has no `weight_map`.")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{_INDEX} in {str(path)!r} lists shard file(s) that do not exist: {absent}."
                                  " The download or copy is incomplete.")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise CheckpointError(f"{str(path)!r} holds only {pickles}: only safetensors checkpoints are"
                                      " supported (pickle files can run code when loaded). Convert them with"
                                      " transformers: `model.save_pretrained(dir, safe_serialization=True)`.")
            raise CheckpointError(f"No model.safetensors or {_INDEX} in {str(path)!r}.")
    from safetensors import safe_open

    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(path / file), "pt") as handle:
                for name in handle.keys():
                    if name in found:
                        raise CheckpointError(f"Tensor {name!r} is in both {found[name][0]} and {file}.")
                    found[name] = (file, tuple(handle.get_slice(name).get_shape()))
        except Exception as e:  # safetensors raises SafetensorError (truncated, corrupt header) or OSError
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"Could not read {file} in {str(path)!r} (truncated or corrupt?): {e}. Fix: copy or"
                                  " download the checkpoint again.") from e
    for name, file in (weight_map or {}).items():
        if found.get(name, (file,))[0] != file:
            raise CheckpointError(f"{_INDEX} maps {name!r} to {file}, but it is in {found[name][0]}.")
        if name not in found:
            raise CheckpointError(f"{_INDEX} maps {name!r} to {file}, which does not contain it.")
    return {k: v for k, v in found.items() if not k.endswith(_IGNORED)}


def _key_problems(needed: set[str], found: set[str], where: str) -> list[str]:
    return ([f"missing from {where}: {sorted(needed - found)}"] if needed - found else []) + (
        [f"unexpected in {where}: {sorted(found - needed)}"] if found - needed else [])


def _local_index(param: Tensor) -> tuple[Tensor, tuple[slice, ...]]:
    """The tensor to write into and, in global coordinates, the block of the full tensor it holds."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


_FIT_HINT = (" Fix: load it into a model built from its own config.json (llama_from_hf, or a recipe's"
             " checkpoint=DIR), or use a checkpoint whose config.json and weights belong to this model.")


def check_hf_checkpoint(model: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Raise :class:`CheckpointError` unless ``path`` can fill the :class:`Llama` at ``prefix`` in ``model``:
    config, tensor names and shapes, readable safetensors files. Reads only ``config.json`` and the safetensors
    headers, and ``model`` may be on the meta device: the launching process runs it before any rank starts."""
    problems = _fit(model, path, prefix)[3]
    if problems:
        raise CheckpointError(f"Cannot load {str(path)!r} into {type(model).__name__}: " + "; ".join(problems) + "."
                              + _FIT_HINT)


def _fit(model: nn.Module, path: str | Path, prefix: str
         ) -> tuple[dict[str, Tensor], dict[str, str], dict[str, tuple[str, tuple[int, ...]]], list[str]]:
    """``(parameters, parameter → tensor name in the files, the files' tensors, problems)`` for loading ``path``
    into the Llama at ``prefix``; the problems are those that hold whatever device the parameters are on."""
    path = Path(path)
    prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
    params = {n[len(prefix):]: p for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(prefix)}
    if not params:
        raise CheckpointError(f"{type(model).__name__} has no parameters under prefix={prefix!r}.")
    llama = model.get_submodule(prefix[:-1]) if prefix else model
    config = getattr(llama, "config", None)
    problems = []
    hf = config_from_hf(_read_json(path / "config.json"))
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
    problems += _key_problems(set(source.values()), set(files) - ({"lm_head.weight"} if tied else set()),
                              "the checkpoint")
    problems += [f"{name}: model {tuple(params[name].shape)} vs checkpoint {files[src][1]}"
                 for name, src in sorted(source.items())
                 if src in files and tuple(params[name].shape) != files[src][1]]
    return params, source, files, problems


def load_hf_checkpoint(model: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load the Hugging Face checkpoint directory ``path`` into the :class:`Llama` at ``prefix`` in ``model``
    (``""``: ``model`` is the Llama; ``"model."``: a :class:`~lightning_tp.CausalLMModule`).

    Parameters may be plain tensors or DTensors (tensor parallel, FSDP2): each rank reads only its own slice
    of each tensor from disk. Call it on every rank after the model has been sharded and materialised. Raises
    :class:`CheckpointError`, before writing any parameter, for a config, key or shape that does not fit.
    """
    path = Path(path)
    params, source, files, problems = _fit(model, path, prefix)
    if any(p.is_meta for p in params.values()):
        problems.append("the model is on the meta device; materialise it (to_empty + init_weights, or let the"
                        " strategy set it up) before loading")
    blocks = {name: _local_index(params[name]) for name in source}  # (local tensor, its block of the full one)
    problems += [f"{name}: the local shard {tuple(local.shape)} is not one block of the full tensor (placements"
                 f" {params[name].placements})" for name, (local, index) in blocks.items()
                 if tuple(local.shape) != tuple(i.stop - i.start for i in index)]
    if problems:
        raise CheckpointError(f"Cannot load {str(path)!r} into {type(model).__name__}: " + "; ".join(problems) + "."
                              + _FIT_HINT)
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, src in sorted(source.items()):
        by_file.setdefault(files[src][0], []).append((name, src))
    # One file open at a time: its memory map (and the page cache it pins in this process) is released before
    # the next; only the slice being copied is ever materialised.
    with torch.no_grad():
        for file, entries in by_file.items():
            with safe_open(str(path / file), "pt") as handle:
                for name, src in entries:
                    local, index = blocks[name]
                    local.copy_(handle.get_slice(src)[index])


def strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``sd`` whose key starts with ``prefix``, with it removed (e.g. ``"model."`` for the
    state dict of a :class:`~lightning_tp.CausalLMModule`)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def export_hf(state_dict: dict[str, Tensor], config: LlamaConfig, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 2 * 1024**3, *,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> list[Path]:
    """Write a Hugging Face checkpoint directory for a :class:`Llama` state dict (plain tensors, HF names).

    ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` shards of at most
    ``max_shard_bytes`` each and ``model.safetensors.index.json``), and the tokenizer files of ``tokenizer_dir``.
    ``lm_head.weight`` is left out when tied. ``dtype`` casts every tensor. The directory is written beside
    ``out_dir`` and renamed into place at the end. Returns the files written.
    """
    from torch.distributed.tensor import DTensor

    out = Path(out_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}
    problems = []
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        head, embed = state_dict.get("lm_head.weight"), state_dict.get("model.embed_tokens.weight")
        plain = all(isinstance(t, Tensor) and not isinstance(t, DTensor) and not t.is_meta for t in (head, embed))
        if plain and head is not embed and not torch.equal(head, embed):
            problems.append("the config ties lm_head.weight to model.embed_tokens.weight, but they differ")
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    problems += _key_problems(set(expected), set(state_dict), "the state dict")
    for k, shape in expected.items():
        t = state_dict.get(k)
        if isinstance(t, DTensor) or (isinstance(t, Tensor) and t.is_meta):
            problems.append(f"{k} is a {'DTensor' if isinstance(t, DTensor) else 'meta tensor'}; pass full tensors"
                            " (consolidated_state_dict, or DTensor.full_tensor())")
        elif t is not None and tuple(t.shape) != shape:
            problems.append(f"{k}: {tuple(t.shape)} vs {shape} for the config")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        problems.append(f"{str(out)!r} exists and is not empty (overwrite=True / --overwrite replaces it)")
    files = []
    if tokenizer_dir is not None:
        files = [Path(tokenizer_dir) / f for f in _TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
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
        tensors[k] = t.clone() if ptr in storages else t  # safetensors refuses tensors sharing memory
        storages.add(ptr)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out.iterdir())


def consolidated_state_dict(checkpoint_dir: str | Path, prefix: str = "model.") -> dict[str, Tensor]:
    """Full plain tensors of the weights in one of this project's sharded (DCP) checkpoints, read in a single
    process without a process group. Keys lose ``"state_dict." + prefix``: ``"model.embed_tokens.weight"``.

    Needs memory for the whole model; tensors keep the checkpoint's dtype.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lightning_tp.checkpoint.consolidate import SafeFileSystemReader  # unpickles only DCP's own metadata classes

    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{str(path)!r} is not a sharded checkpoint directory (no .metadata file). Point it at"
                              " a directory written by a TensorParallelStrategy run, e.g. out/pretrain/last.")
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"Could not read {str(path / '.metadata')!r}: {e}") from e
    head = "state_dict." + prefix
    entries = {k[len("state_dict."):]: v for k, v in metadata.state_dict_metadata.items()
               if k.startswith(head) and isinstance(v, TensorStorageMetadata)}
    if not entries:
        seen = sorted({".".join(k.split(".")[:2]) for k in metadata.state_dict_metadata})
        raise CheckpointError(f"No tensors under {head!r} in {str(path)!r}; it holds {seen}. Check `prefix`.")
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in entries.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load({"state_dict": state}, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"Could not read the weights in {str(path)!r}: {e}") from e
    return strip_prefix(state, prefix)
