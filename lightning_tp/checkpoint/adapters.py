"""Exports of a LoRA fine-tune's checkpoint: the adapters in PEFT's format, or a model with them
folded in (``lightning-tp export CHECKPOINT OUT --adapters | --merged [--base DIR]``).

A checkpoint the strategy saves while LoRA adapters train holds the adapters and their optimizer
state only (``meta.pt`` layout ``adapters_only``; the frozen base is the checkpoint fine-tuning
started from). Its layout also records each PEFT model's path in the LightningModule and its
adapters' ``LoraConfig`` (``peft``), and the base model's transformers config (``transformers``).
:func:`read_adapters` reads the adapters as full tensors in one process, without a process group
(:func:`.hf_export.consolidated_state_dict`), and :func:`export_adapters` writes either

* **the adapters** (``merged=False``): what ``PeftModel.save_pretrained(OUT)`` writes,
  ``adapter_model.safetensors`` + ``adapter_config.json`` per adapter (``default`` in ``OUT``, any
  other name in ``OUT/<name>``, as PEFT does), loaded by ``PeftModel.from_pretrained(base, OUT)``
  onto the transformers model (this project's native ``Llama`` has the module names of
  ``LlamaForCausalLM``, so its adapters load there too); or
* **the merged model** (``merged=True``): the base weights with ``W += scaling · B @ A`` for every
  adapted projection (``scaling = lora_alpha / r``, ``/ sqrt(r)`` with ``use_rslora``; ``r`` and
  ``alpha`` per module as PEFT resolves ``rank_pattern``/``alpha_pattern``), written with
  transformers' ``save_pretrained`` so that ``AutoModelForCausalLM.from_pretrained`` loads it.
  The base comes from ``base`` (a Hugging Face directory, or one of this project's sharded
  checkpoints, first exported as ``lightning-tp export`` does into a temporary directory beside
  ``OUT``: one more copy of the model on disk while it runs), else from the recorded
  ``base_model_name_or_path`` when that is a local directory.

A column-parallel style that stores its weight rows in another order (the fused projections of
:mod:`lightning_tp.parallel.fused`) stores the adapter's ``lora_B`` in that order too, when the run
had tp > 1 (at tp 1 the plan is not applied); :func:`read_adapters` puts it back in the model's own
(:func:`.hf_family.model_layout`).
Only plain LoRA on linear projections is exported (what the plan shards); any other trainable
tensor under the PEFT model (``modules_to_save``, trainable biases) is refused by name.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_tp.checkpoint.hf_config import TOKENIZER_FILES
from lightning_tp.checkpoint.hf_export import consolidated_state_dict
from lightning_tp.checkpoint.layout import DCP_METADATA, LAYOUT_KEY, META_FILE, atomic_write
from lightning_tp.checkpoint.safe_reading import read_checkpoint_metadata, read_meta
from lightning_tp.errors import CheckpointError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "Adapters", "adapter_layout", "export_adapters",
           "fold_adapters", "peft_key", "read_adapters"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_ROOT = "base_model.model."
"""Where a ``PeftModel`` keeps the model it wraps (``PeftModel.base_model`` is the ``LoraModel``,
whose ``model`` is the user's): the prefix of every adapter key, in the model and on disk."""
_LORA_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<factor>[AB])\.(?P<name>[^.]+)\.weight")
_INSTALL = 'pip install "lightning-tp[lora]"'


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CheckpointError(f"{what} needs the `{module}` package, which is not installed ({e})."
                              f" Fix: {_INSTALL}.") from e


def peft_key(key: str, adapter: str) -> str:
    """The on-disk key of the model key ``key`` of adapter ``adapter``, by PEFT's rule
    (``get_peft_model_state_dict``): the adapter name is dropped from the module path, whatever
    the name, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.sft.weight`` →
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; only the component right
    before the parameter's own name is removed, so a module that happens to share the adapter's
    name keeps it."""
    if key.endswith(f".{adapter}"):  # an nn.Parameter held by name (no ".weight" after it)
        return key.removesuffix(f".{adapter}")
    head, _, suffix = key.rpartition(".")
    return f"{head.removesuffix(f'.{adapter}')}.{suffix}"


@dataclasses.dataclass(frozen=True)
class Adapters:
    """The trained LoRA adapters of the PEFT model in a checkpoint (full tensors, on the CPU)."""

    root: str
    """the ``PeftModel``'s path in the LightningModule (``"model"``)"""
    configs: dict[str, dict[str, Any]]
    """adapter name → its ``LoraConfig.to_dict()`` as recorded (the adapters with weights only)"""
    weights: dict[str, dict[str, tuple[Tensor, Tensor]]]
    """adapter name → {path of the adapted module inside the wrapped model: (lora_A, lora_B)}"""
    model_config: dict[str, Any] | None
    """the wrapped model's transformers ``config.to_dict()``; None for the native ``Llama``"""

    def peft_state_dict(self, adapter: str) -> dict[str, Tensor]:
        """Adapter ``adapter``'s tensors keyed as ``PeftModel.save_pretrained`` writes them."""
        return {peft_key(f"{_PEFT_ROOT}{path}.lora_{factor}.{adapter}.weight", adapter): t
                for path, pair in self.weights[adapter].items()
                for factor, t in zip("AB", pair, strict=True)}

    def scaling(self, adapter: str, path: str) -> float:
        """PEFT's ``scaling[adapter]`` of the layer at ``path``: ``lora_alpha / r`` (rsLoRA:
        ``/ sqrt(r)``), ``alpha`` from ``alpha_pattern`` if a key matches ``path`` (PEFT's
        ``get_pattern_key``), ``r`` the rank of the stored factors (which ``rank_pattern`` set)."""
        config = self.configs[adapter]
        r = self.weights[adapter][path][0].shape[0]
        alpha = config["lora_alpha"]
        if config.get("alpha_pattern"):
            other = _require("peft.utils.other", "An alpha_pattern")
            key = other.get_pattern_key(config["alpha_pattern"].keys(), path)
            alpha = config["alpha_pattern"].get(key, alpha)
        return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def adapter_layout(checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` is a sharded checkpoint holding LoRA adapters only (``False`` when it
    has no ``meta.pt`` or one that cannot be read with ``weights_only``)."""
    path = Path(checkpoint)
    if not (path / META_FILE).is_file():
        return False
    try:
        layout = read_meta(path, weights_only=True).get(LAYOUT_KEY) or {}
    except Exception:  # noqa: BLE001 - not readable safely: the export that reads it says why
        return False
    return bool(layout.get("adapters_only") and layout.get("peft"))


def _layout(checkpoint: Path, flag: str) -> dict[str, Any]:
    if checkpoint.is_file() or not (checkpoint / DCP_METADATA).is_file():
        raise CheckpointError(f"{flag}: {str(checkpoint)!r} is not a sharded checkpoint directory"
                              " of a LoRA fine-tune. Fix: pass the directory the run saved, e.g."
                              " out/finetune/last (not a consolidated file).")
    read_checkpoint_metadata(checkpoint)  # complete, every shard file there and long enough
    try:
        meta = read_meta(checkpoint, weights_only=True)
    except Exception as e:  # noqa: BLE001 - named with the fix
        raise CheckpointError(f"{flag}: {str(checkpoint / META_FILE)!r} cannot be read safely"
                              f" (weights_only): {e}") from e
    layout = meta.get(LAYOUT_KEY) or {}
    if not layout.get("adapters_only") or not layout.get("peft"):
        raise CheckpointError(f"{flag}: {str(checkpoint)!r} holds no LoRA adapters (it is not an"
                              " adapter checkpoint of a LoRA fine-tune: its layout records no PEFT"
                              f" model). Fix: export it without {flag}, `lightning-tp export"
                              f" {checkpoint} OUT_DIR`.")
    return layout


def read_adapters(checkpoint: str | Path, *, flag: str = "--adapters") -> Adapters:
    """The LoRA adapters of the adapter checkpoint ``checkpoint`` (a sharded directory), as full
    tensors, in one process without a process group. ``flag`` names the command-line option in
    errors. Only adapters that trained are in it (an inactive adapter is frozen, so not saved).

    Raises:
        CheckpointError: not a complete adapter checkpoint, several PEFT models in it, or trainable
            tensors other than LoRA factors under the PEFT model.
    """
    checkpoint = Path(checkpoint)
    layout = _layout(checkpoint, flag)
    if len(layout["peft"]) != 1:
        raise CheckpointError(f"{flag}: {str(checkpoint)!r} holds {len(layout['peft'])} PEFT"
                              f" models ({sorted(layout['peft'])}); the export writes one. Fix:"
                              " keep one PeftModel in the LightningModule.")
    root, configs = next(iter(layout["peft"].items()))
    # The strategy records a transformers model at the path of the PeftModel that wraps it (the
    # PeftModel passes `config` through) or, seen from inside, at the wrapped model's own path.
    known = layout.get("transformers") or {}
    inner = f"{root}.{_PEFT_ROOT}" if root else _PEFT_ROOT
    model_config = known.get(root, known.get(inner.rstrip(".")))
    state = consolidated_state_dict(checkpoint, prefix=f"{root}." if root else "")
    weights: dict[str, dict[str, dict[str, Tensor]]] = {}
    unknown = []
    for key, tensor in state.items():
        match = _LORA_KEY.fullmatch(key.removeprefix(_PEFT_ROOT))
        if not key.startswith(_PEFT_ROOT) or match is None or match["name"] not in configs:
            unknown.append(key)
            continue
        pair = weights.setdefault(match["name"], {}).setdefault(match["path"], {})
        pair[match["factor"]] = tensor
    unknown += [f"{_PEFT_ROOT}{path}.lora_{'B' if 'A' in pair else 'A'}.{name}.weight (missing)"
                for name, paths in weights.items() for path, pair in paths.items()
                if len(pair) != 2]
    if unknown:
        raise CheckpointError(f"{flag}: {str(checkpoint)!r} holds trainable tensors under the PEFT"
                              f" model {root!r} that are not LoRA factors of a recorded adapter:"
                              f" {unknown[:4]}{' ...' if len(unknown) > 4 else ''}. Only plain"
                              " LoRA on linear projections is exported. Fix: train without"
                              " modules_to_save and with bias='none'.")
    if not weights:
        raise CheckpointError(f"{flag}: {str(checkpoint)!r} holds no trained LoRA factors under the"
                              f" PEFT model {root!r}. Fix: save the checkpoint while the adapters"
                              " train (requires_grad), or export the checkpoint it started from.")
    adapters = {name: {path: (pair["A"], pair["B"]) for path, pair in sorted(paths.items())}
                for name, paths in weights.items()}
    if model_config is not None and int(layout.get("tensor_parallel_size") or 1) > 1:
        # at tp 1 the plan is not applied: every weight keeps the model's own layout
        adapters = {name: _model_layout(model_config, pairs) for name, pairs in adapters.items()}
    return Adapters(root, {name: configs[name] for name in adapters}, adapters, model_config)


def _model_layout(model_config: dict[str, Any], pairs: dict[str, tuple[Tensor, Tensor]]
                  ) -> dict[str, tuple[Tensor, Tensor]]:
    """``pairs`` with each ``lora_B`` in its base's own row order: a column-parallel style gives
    ``lora_B`` the base weight's sharding, row order included (a model built on meta, only to
    resolve the plan)."""
    transformers = _require("transformers", "Exporting the adapters of a transformers model")
    from lightning_tp.checkpoint.hf_family import model_layout

    config = dict(model_config)
    config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    rows = model_layout(model, {f"{path}.weight": b for path, (_, b) in pairs.items()})
    return {path: (a, rows[f"{path}.weight"]) for path, (a, _) in pairs.items()}


def fold_adapters(model: torch.nn.Module, adapters: Adapters, adapter: str,
                  where: str = "the base") -> None:
    """Add adapter ``adapter`` into the projections of ``model`` (the wrapped model, e.g. a
    ``LlamaForCausalLM`` with the base weights): ``W += scaling · B @ A``, computed in float32 and
    stored in ``W``'s dtype. Every projection is checked before any is changed.

    Raises:
        CheckpointError: a module is missing from ``model`` or its weight's shape is not the
            adapters' ``(out, in)``; the message names ``where`` the model came from.
    """
    config = adapters.configs[adapter]
    problems, targets = [], []
    for path, (a, b) in adapters.weights[adapter].items():
        try:
            weight = model.get_submodule(path).weight
        except AttributeError:
            problems.append(f"{path}: not in the base")
            continue
        need = (b.shape[0], a.shape[1])
        need = need[::-1] if config.get("fan_in_fan_out") else need
        if tuple(weight.shape) != need:
            problems.append(f"{path}.weight: {tuple(weight.shape)} in the base, the adapters (rank"
                            f" {a.shape[0]}) need {need}")
        targets.append((weight, path, a, b))
    if problems:
        raise CheckpointError(f"--merged: {where} does not fit the adapters:"
                              f" {'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}."
                              " Fix: pass --base the model this fine-tune started from.")
    with torch.no_grad():
        for weight, path, a, b in targets:
            delta = (b.float() @ a.float()) * adapters.scaling(adapter, path)
            delta = delta.T if config.get("fan_in_fan_out") else delta
            weight.copy_((weight.float() + delta).to(weight.dtype))


def _auto_mapping(adapters: Adapters) -> dict[str, str] | None:
    """What ``PeftModel.save_pretrained`` records for a config without ``task_type`` (the base
    model's class, for ``AutoPeftModel``); the native ``Llama`` maps onto ``LlamaForCausalLM``."""
    model_type = (adapters.model_config or {}).get("model_type", "llama")
    architectures = (adapters.model_config or {}).get("architectures") or []
    try:
        transformers = importlib.import_module("transformers")
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = architectures[0] if architectures else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        return {"base_model_class": name, "parent_library": getattr(transformers, name).__module__}
    except (ImportError, KeyError, AttributeError):
        return None


def _write_adapters(adapters: Adapters, staged: Path, base: str | None,
                    dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    for name, config in adapters.configs.items():
        folder = staged if name == "default" else staged / name  # PEFT's own layout
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.to(dtype or t.dtype).contiguous()
                   for k, t in adapters.peft_state_dict(name).items()}
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = {**config, "inference_mode": True}
        if base is not None:
            config["base_model_name_or_path"] = base
        if config.get("task_type") is None and (mapping := _auto_mapping(adapters)):
            config["auto_mapping"] = mapping
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def _base_dir(adapters: Adapters, base: str | Path | None) -> tuple[Path, str]:
    """The base model's directory and how to name it in errors."""
    if base is not None:
        path, where = Path(base), f"--base {str(base)!r}"
    else:
        recorded = {c.get("base_model_name_or_path") for c in adapters.configs.values()} - {None}
        path = Path(next(iter(recorded))) if len(recorded) == 1 else None
        where = f"the recorded base_model_name_or_path {str(path)!r}"
        if path is None or not path.is_dir():
            raise CheckpointError(
                "--merged needs the base weights, which an adapter checkpoint does not hold, and"
                f" the recorded base_model_name_or_path ({sorted(recorded) or None}) is not a local"
                " directory. Fix: pass --base DIR (base=), the Hugging Face directory or sharded"
                " checkpoint this fine-tune started from.")
    from lightning_tp.checkpoint.weights import is_hf_checkpoint

    if not (is_hf_checkpoint(path) or (path / DCP_METADATA).is_file()):
        raise CheckpointError(f"--merged: {where} is neither a Hugging Face model directory"
                              " (config.json beside *.safetensors) nor a sharded checkpoint"
                              " directory. Fix: pass --base DIR (base=), the model this fine-tune"
                              " started from.")
    return path, where


def _export_base(path: Path, into: Path, where: str) -> Path:
    """A sharded base checkpoint as a Hugging Face directory ``into``, as ``lightning-tp export``
    writes it."""
    from lightning_tp.checkpoint.hf_export import export_checkpoint
    from lightning_tp.checkpoint.hf_family import export_transformers, transformers_models

    try:
        layout = read_meta(path, weights_only=True).get(LAYOUT_KEY) or {}
    except Exception:  # noqa: BLE001 - no readable layout: the native export says what is wrong
        layout = {}
    if layout.get("adapters_only"):
        raise CheckpointError(f"--merged: {where} is an adapter checkpoint itself; it holds no"
                              " base weights. Fix: pass --base DIR (base=), the checkpoint the"
                              " fine-tune started from.")
    if transformers_models(path):
        export_transformers(path, into)
    else:
        export_checkpoint(path, into)
    return into


def _write_merged(adapters: Adapters, out: Path, base: str | Path | None,
                  tokenizer: str | Path | None, dtype: torch.dtype | None) -> None:
    transformers = _require("transformers", "--merged")
    if len(adapters.configs) != 1:
        raise CheckpointError(f"--merged: the checkpoint holds {len(adapters.configs)} trained"
                              f" adapters ({sorted(adapters.configs)}) and a merged model takes"
                              " one. Fix: export them with --adapters and merge the one you want"
                              " with PEFT (merge_and_unload).")
    (name,) = adapters.configs
    path, where = _base_dir(adapters, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.base-") as scratch:
        if not (path / DCP_METADATA).is_file():
            hf_dir = path
        else:
            hf_dir = _export_base(path, Path(scratch) / "base", where)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
        fold_adapters(model, adapters, name, where)
        if dtype is not None:
            model.to(dtype)
        source = Path(tokenizer) if tokenizer is not None else hf_dir
        files = [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
        with atomic_write(out, directory=True) as staged:
            model.save_pretrained(staged)
            for f in files:
                shutil.copyfile(f, staged / f.name)


def export_adapters(checkpoint: str | Path, out_dir: str | Path, *, merged: bool = False,
                    base: str | Path | None = None, tokenizer: str | Path | None = None,
                    dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Export the adapter checkpoint ``checkpoint`` of a LoRA fine-tune to ``out_dir``: the
    adapters in PEFT's format, or (``merged=True``) the base model ``base`` with them folded in, as
    a Hugging Face directory (see the module's docstring). Returns ``out_dir``.

    Without ``merged``, ``base`` only sets ``base_model_name_or_path`` in ``adapter_config.json``.
    With it, ``tokenizer`` (default: the base directory's tokenizer files) is copied beside the
    weights. ``dtype`` casts what is written. An existing non-empty ``out_dir`` is refused unless
    ``overwrite``; it is written beside and renamed into place at the end.

    Raises:
        CheckpointError: no adapters in ``checkpoint``; ``merged`` without a base (``base`` or a
            recorded local ``base_model_name_or_path``); a base whose shapes do not fit the
            adapters; ``out_dir`` not empty.
    """
    flag = "--merged" if merged else "--adapters"
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{flag}: cannot export to {str(out)!r}: it exists and is not empty."
                              " Fix: choose another directory, or pass overwrite=True"
                              " (--overwrite).")
    adapters = read_adapters(checkpoint, flag=flag)
    if merged:
        _write_merged(adapters, out, base, tokenizer, dtype)
    else:
        with atomic_write(out, directory=True) as staged:
            _write_adapters(adapters, staged, None if base is None else str(base), dtype)
    return out
