"""``python -m benchmarks {comm,activations,throughput,efficiency,lora,grid,gpu,all} [--quick] [--json OUT]``.

Each command launches its own ranks (``OMP_NUM_THREADS`` set per rank), prints a markdown report with
the measured ratios, and with ``--json`` also writes the raw measurements. ``--quick`` shrinks models,
steps and pairs so that every path runs in seconds (the smoke test uses it; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any

from benchmarks._common import launch, machine


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("command", choices=["comm", "activations", "memory", "throughput", "efficiency", "cpu", "lora",
                                       "grid", "gpu", "all"],
                   help="comm: collectives/bytes per layer; activations: saved bytes per layer vs Korthikanti;"
                        " throughput: ours vs Lightning's ModelParallelStrategy; efficiency: tp=2 vs tp=1;"
                        " memory: comm + activations in one launch; cpu: throughput + efficiency in one launch;"
                        " lora: LoRA vs full fine-tuning (tokens/s, memory per rank, collectives);"
                        " grid: 2D grids vs 1D on --world ranks (collectives per layer; tokens/s at 4);"
                        " gpu: single-device tokens/s and MFU; all: every CPU benchmark")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one pair: checks the paths, not the speed")
    p.add_argument("--json", metavar="OUT", help="also write the raw results to OUT")
    p.add_argument("--world", type=int, default=4, help="ranks for comm/activations (TP degrees 2 and 4 need 4)")
    p.add_argument("--pairs", type=int, default=None, help="paired alternating runs for throughput/efficiency")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each run")
    p.add_argument("--preset", default=None, help="model preset (gpu default llama3_1b; cpu default small)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size")
    p.add_argument("--seq", type=int, default=None, help="sequence length (activations: default 256)")
    p.add_argument("--device", default="cuda", help="gpu command: device to run on (cpu works for a dry run)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="gpu command: run eager")
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"],
                   help="gpu command: recompute mode for the decoder blocks")
    return p


def _throughput_options(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    opts: dict[str, Any] = {
        "preset": args.preset or ("quick" if quick else "throughput"),
        "batch": args.batch or (2 if quick else 4),
        "seq": args.seq or (32 if quick else 256),
        "steps": args.steps or (2 if quick else 8),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
        "pairs": args.pairs or (1 if quick else 5),
    }
    return opts


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from benchmarks import activations, comm, grid, lora, throughput

    if args.command == "grid" and not grid.grids_for(args.world):
        parser.error(f"grid: --world {args.world} has no r × c grid with r, c > 1 (use --world 4 or 8)")

    print(f"Machine: {machine()}\n", flush=True)
    results: dict[str, Any] = {}
    cmd = args.command
    memory_tasks = []
    if cmd in ("comm", "memory", "all"):
        memory_tasks.append({"task": "comm", **({"batch": 1, "seq": 32} if args.quick else {})})
    if cmd in ("activations", "memory", "all"):
        memory_tasks.append({"task": "activations", "seq": args.seq or (64 if args.quick else 256)})
    cpu_tasks = []
    opts = _throughput_options(args)
    if cmd in ("throughput", "cpu", "all"):
        cpu_tasks.append({"task": "vs_stock", **opts})
    if cmd in ("efficiency", "cpu", "all"):
        cpu_tasks.append({"task": "efficiency", **opts})
    if cmd == "lora" or (cmd == "all" and importlib.util.find_spec("peft") is not None):
        cpu_tasks.append({"task": "lora", **opts, "warmup_runs": 0 if args.quick else 1,
                          "variants": ["lora", "full"] if args.quick else list(lora.VARIANTS)})
    elif cmd == "all":
        print('lora: skipped, PEFT is not installed (pip install "lightning-tp[lora]")\n', flush=True)
    if memory_tasks and args.world == 2:
        cpu_tasks = memory_tasks + cpu_tasks  # one launch pays the imports once
    elif memory_tasks:
        results.update(launch(memory_tasks, nprocs=args.world, threads=1))
    if cpu_tasks:
        results.update(launch(cpu_tasks, nprocs=2, threads=1))
    if cmd == "grid":  # 2D needs a grid: 4 ranks (2×2, with tokens/s) or 8 (2×4, 4×2)
        grid_tasks: list[dict[str, Any]] = [{"task": "grid_comm", "quick": args.quick}]
        if args.world == 4 and args.pairs != 0:  # --pairs 0: the collectives only
            grid_tasks.append({"task": "grid_speed", **opts, "pairs": args.pairs or (1 if args.quick else 3)})
        results.update(launch(grid_tasks, nprocs=args.world, threads=1))
    if cmd == "gpu":
        results["gpu"] = throughput.measure_single_device(
            device=args.device, preset=args.preset or ("debug" if args.quick else "llama3_1b"),
            batch=args.batch or (2 if args.quick else 4), seq=args.seq or (32 if args.quick else 2048),
            steps=args.steps or (2 if args.quick else 20), warmup=args.warmup if args.warmup is not None else 3,
            compile=args.compile, activation_checkpointing=args.activation_checkpointing)
    reports = {"comm": comm.report, "activations": activations.report, "vs_stock": throughput.report_vs_stock,
               "efficiency": throughput.report_efficiency, "lora": lora.report, "gpu": throughput.report_single_device,
               "grid_comm": grid.report_comm, "grid_speed": grid.report_speed}
    for name, result in results.items():
        print(reports[name](result) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
