"""The ``lightning-tp plan`` command line: :data:`USAGE` and :func:`main`."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

from lightning_tp.errors import LightningTPError
from lightning_tp.planner.crossover import compare_2d
from lightning_tp.planner.inputs import compose_inputs
from lightning_tp.planner.report import analyze
from lightning_tp.planner.text import format_crossover, format_report

__all__ = ["USAGE", "main"]

USAGE = """usage: lightning-tp plan [key=value ...] [--json] [--cfg]

Estimate memory, communication and step time of a layout without a GPU, and recommend
(tp, dp, checkpointing). Examples:
  lightning-tp plan model=llama3_8b strategy.tensor_parallel_size=1 strategy.data_parallel_size=8
  lightning-tp plan model=llama3_70b strategy.tensor_parallel_size=8 \\
      strategy.data_parallel_size=32 strategy.activation_checkpointing=full accelerator=h100 \\
      link=ib_ndr
  lightning-tp plan checkpoint=/models/Helium-2B strategy.tensor_parallel_size=4
  lightning-tp plan model=llama3_70b strategy.tensor_parallel_size=8 \\
      strategy.data_parallel_size=1 peft=lora peft.rank=16 accelerator=h100
  lightning-tp plan model=llama3_8b strategy.tensor_parallel_size=[4,2]   # 2D grid r x c
  lightning-tp plan model=llama3_8b compare_2d=true   # where 2D beats 1D (tp 4, 8, 16)
Keys: model (a preset; model.<field> overrides), checkpoint (a Hugging Face model directory or its
config.json, planned instead of model), peft=none|lora (peft.rank, alpha, dropout,
target_modules: LoRA, the base frozen), strategy.* (tensor_parallel_size, or [r,c] for a 2D
grid, data_parallel_size, sequence_parallel, loss_parallel, fsdp, reshard_after_forward,
activation_checkpointing, compile, float8, async_tp, save_sharded_inputs), trainer.precision /
accumulate_grad_batches / devices / num_nodes, data.seq_len, data.batch_size, accelerator, link,
intra_node_link, devices_per_node, efficiency, float8_all_gather, memory_headroom, hardware_file,
output=text|json, top, compare_2d.
See docs/planner.md."""


def main(argv: Optional[list[str]] = None) -> None:
    """Run ``lightning-tp plan`` on ``argv`` (default ``sys.argv[1:]``); a typed error ends it with
    one line (``SystemExit``) whose ``__cause__`` is the error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return
    as_json = "--json" in argv
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a not in ("--json", "--cfg")]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise SystemExit(f"lightning-tp plan: arguments {bad} are not key=value overrides or"
                         f" --json/--cfg.\n{USAGE}")
    try:
        inputs, cfg = compose_inputs(overrides)
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return
        if cfg.compare_2d:
            rows = compare_2d(inputs)
        else:
            report = analyze(inputs, top=cfg.top)
    except LightningTPError as e:  # the typed error stays attached as __cause__ for callers
        raise SystemExit(f"lightning-tp plan: {type(e).__name__}: {e}") from e
    json_out = as_json or cfg.output == "json"
    if cfg.compare_2d:
        print(json.dumps([dataclasses.asdict(x) | {"wins_bytes": x.wins_bytes,
                                                   "wins_time": x.wins_time} for x in rows],
                         indent=2) if json_out else format_crossover(rows))
        return
    print(report.to_json() if json_out else format_report(report))


if __name__ == "__main__":
    main()
