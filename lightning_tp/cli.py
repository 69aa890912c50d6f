"""``lightning-tp``: the console entry point. ``lightning-tp pretrain|finetune [hydra overrides and flags]``.

Every argument after the recipe name goes to Hydra unchanged (``key=value``, ``--cfg job``,
``--multirun``, ``--help``). The recipes are the package modules ``lightning_tp.recipes.pretrain|finetune``
with their configs in ``lightning_tp/conf``, so the command works from a wheel as from a clone; it runs them as
``python -m lightning_tp.recipes.NAME ...`` would, so Lightning's launcher re-runs that module for the other
ranks.

Two conversions run in one process, without a process group:

* ``lightning-tp export CHECKPOINT_DIR OUT_DIR [--model M] [--tokenizer DIR]``: a sharded checkpoint of a
  training run → a Hugging Face directory (``config.json`` + safetensors) that transformers loads.
* ``lightning-tp import HF_DIR OUT_DIR``: a Hugging Face Llama directory → a sharded checkpoint that
  ``finetune checkpoint=OUT_DIR`` (or :func:`lightning_tp.checkpoint.load_weights`) starts from.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

RECIPES = ("pretrain", "finetune")
# non-recipe subcommands: module whose main(argv) runs them
TOOLS = {"consolidate": "lightning_tp.checkpoint.consolidate", "plan": "lightning_tp.planner"}
USAGE = (f"usage: lightning-tp {{{','.join(RECIPES)}}} [key=value ...] [--cfg job] [--multirun] [--help]\n"
         "       lightning-tp consolidate CHECKPOINT_DIR OUT_FILE\n"
         "       lightning-tp plan [key=value ...] [--json]   (dry run: memory, communication, step time; no GPU)\n"
         "       lightning-tp export CHECKPOINT_DIR OUT_DIR [--model PRESET_OR_CONFIG_JSON] [--tokenizer DIR]\n"
         "       lightning-tp import HF_DIR OUT_DIR")
CONVERSIONS = ("export", "import")  # Hugging Face checkpoints out and in (lightning_tp.checkpoint.hf)


def recipe_module(name: str) -> str:
    """The module ``lightning-tp NAME`` runs as ``python -m`` would (``lightning_tp.recipes.NAME``)."""
    return f"lightning_tp.recipes.{name}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] in TOOLS:
        import importlib

        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return
    if argv[0] in CONVERSIONS:
        return {"export": export_main, "import": import_main}[argv[0]](argv[1:])
    if argv[0] not in RECIPES:
        raise SystemExit(f"lightning-tp: unknown recipe {argv[0]!r}; choose one of {', '.join(RECIPES)}.\n{USAGE}")
    # As `python -m`: while it runs, __main__ is the recipe module (its __spec__ names it), which is what
    # Lightning's launcher re-runs for ranks > 0 (`python -m lightning_tp.recipes.NAME` + sys.argv[1:]).
    sys.argv = [f"lightning-tp {argv[0]}", *argv[1:]]
    runpy.run_module(recipe_module(argv[0]), run_name="__main__", alter_sys=True)


def _config_from_arg(spec: str) -> Any:
    """A preset name, a Hugging Face ``config.json``, or a JSON file of :class:`LlamaConfig` fields."""
    import json

    from lightning_tp.checkpoint.hf import config_from_hf
    from lightning_tp.models import LlamaConfig, get_config

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        return get_config(spec)
    data = json.loads(path.read_text())
    return config_from_hf(data) if "model_type" in data else LlamaConfig(**data)


def _checkpoint_meta(checkpoint: Path, model: str | None) -> dict[str, Any]:
    """Lightning's ``meta.pt`` beside a sharded checkpoint, read without unpickling code; ``{}`` if absent."""
    import torch

    file = checkpoint / "meta.pt"
    if not file.is_file():
        return {}
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        if model is None:
            raise SystemExit(f"lightning-tp export: {str(file)!r} cannot be read safely (weights_only): {e}\n"
                             "Pass the model with --model PRESET_OR_CONFIG_JSON.") from None
        return {}


def export_main(argv: list[str]) -> None:
    """``lightning-tp export``: a sharded checkpoint → a Hugging Face checkpoint directory."""
    import dataclasses

    import torch

    from lightning_tp.checkpoint.hf import consolidated_state_dict, export_hf
    from lightning_tp.errors import CheckpointError
    from lightning_tp.models import LlamaConfig, get_config

    parser = argparse.ArgumentParser(prog="lightning-tp export", description=export_main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="a sharded checkpoint directory, e.g. out/pretrain/last")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--model", help="preset name or config JSON; default: the checkpoint's hyper-parameters")
    parser.add_argument("--tokenizer", help="directory with tokenizer.json to copy; default: the one trained with")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights")
    parser.add_argument("--max-shard-bytes", type=int, default=2 * 1024**3, help="split larger weights into files")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    meta = _checkpoint_meta(args.checkpoint, args.model)
    try:
        saved = (meta.get("hyper_parameters") or {}).get("model")
        config = None
        if saved is not None:
            config = get_config(saved) if isinstance(saved, str) else LlamaConfig(**saved)
        if args.model is not None:
            given = _config_from_arg(args.model)
            same = config is None or dataclasses.replace(given, head_dim=given.resolved_head_dim) == \
                dataclasses.replace(config, head_dim=config.resolved_head_dim)
            if not same:
                raise CheckpointError(f"--model {args.model!r} gives {given}, but the checkpoint was trained with"
                                      f" {config}. Leave --model out to use the checkpoint's.")
            config = given
        if config is None:
            raise CheckpointError(f"{str(args.checkpoint)!r} has no meta.pt with the model's hyper-parameters;"
                                  " pass --model PRESET_OR_CONFIG_JSON.")
        tokenizer = args.tokenizer
        if tokenizer is None:  # the tokenizer the run was trained with, when it is a file or directory
            trained = (meta.get("datamodule_hyper_parameters") or {}).get("tokenizer")
            if isinstance(trained, str) and Path(trained).exists():
                tokenizer = trained if Path(trained).is_dir() else str(Path(trained).parent)
        written = export_hf(consolidated_state_dict(args.checkpoint), config, args.out_dir, tokenizer_dir=tokenizer,
                            max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite,
                            dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (CheckpointError, KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"lightning-tp export: {e}") from e
    print(f"Exported {args.checkpoint} ({config.num_params:,} parameters) to {args.out_dir}:")
    for file in written:
        print(f"  {file.name}  ({file.stat().st_size:,} bytes)")
    if tokenizer is None:
        print("  (no tokenizer copied: pass --tokenizer DIR with the tokenizer.json the model was trained with)")


def import_main(argv: list[str]) -> None:
    """``lightning-tp import``: a Hugging Face Llama directory → a sharded checkpoint to fine-tune from."""
    import dataclasses
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from lightning_tp.checkpoint.hf import llama_from_hf
    from lightning_tp.errors import CheckpointError

    parser = argparse.ArgumentParser(prog="lightning-tp import", description=import_main.__doc__)
    parser.add_argument("hf_dir", type=Path, help="config.json + model.safetensors (or shards with an index)")
    parser.add_argument("out_dir", type=Path, help="the sharded checkpoint directory to write")
    args = parser.parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        raise SystemExit(f"lightning-tp import: {str(args.out_dir)!r} exists and is not empty.")
    try:
        model = llama_from_hf(args.hf_dir, device="cpu")
    except CheckpointError as e:
        raise SystemExit(f"lightning-tp import: {e}") from e
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        # Keys as a CausalLMModule's (its Llama is `model`), so `load_weights` finds them.
        dcp.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
                 checkpoint_id=str(args.out_dir), no_dist=True)
    # The model's hyper-parameters, as Lightning saves them, so that `lightning-tp export` reads the config back.
    torch.save({"hyper_parameters": {"model": dataclasses.asdict(model.config)}}, args.out_dir / "meta.pt")
    print(f"Imported {args.hf_dir} ({model.config.num_params:,} parameters) to {args.out_dir}. Fine-tune from it with"
          f" `lightning-tp finetune checkpoint={args.out_dir}` and a model config equal to:\n  {model.config}")


if __name__ == "__main__":
    main()
