"""Shared pieces of the benchmark harness: launching ranks, the benchmark model, statistics, tables.

The launcher starts ``nprocs`` plain Python processes running :mod:`benchmarks._worker` with the
environment ``torchrun`` would give them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``)
and ``OMP_NUM_THREADS`` per rank. Lightning sees ``LOCAL_RANK`` and treats the processes as created
externally, so a ``Trainer`` inside a worker joins the same gloo process group. Only rank 0 writes results.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class BenchmarkError(RuntimeError):
    """A benchmark worker failed or a measurement is unusable; the message carries the worker log tail."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tasks: Sequence[dict[str, Any]], nprocs: int, threads: int = 1, timeout: float = 1800) -> dict[str, Any]:
    """Run ``tasks`` (each ``{"task": name, ...options}``) in ``nprocs`` ranks; return rank 0's results by name."""
    if nprocs < 1 or threads < 1:
        raise ValueError(f"nprocs and threads must be positive, got nprocs={nprocs}, threads={threads}")
    with tempfile.TemporaryDirectory(prefix="lightning_tp_bench_") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"tasks": list(tasks)}))
        port = str(_free_port())
        procs, logs = [], []
        drop = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID")
        for rank in range(nprocs):
            env = {k: v for k, v in os.environ.items() if k not in drop}
            env.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), NODE_RANK="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=str(threads),
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
                PYTHONWARNINGS="ignore",
            )
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks._worker", str(spec), str(out)],
                                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        failed = None
        for rank, proc in enumerate(procs):
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0 and failed is None:
                failed = (rank, rc)
                for other in procs:  # a dead rank leaves the others blocked in a collective
                    if other.poll() is None:
                        other.kill()
        if failed is not None or not out.exists():
            rank = failed[0] if failed else 0
            logs[rank].seek(0)
            raise BenchmarkError(f"benchmark rank {rank} exited with {failed[1] if failed else 0}:\n"
                                 + logs[rank].read()[-6000:])
        for log in logs:
            log.close()
        return json.loads(out.read_text())


def bench_config(name: str = "activations", **overrides: Any) -> Any:
    """The Llama shapes the benchmarks use.

    ``"activations"``/``"comm"``: hidden 512, 8 heads, 4 kv heads (GQA; kv heads must divide by tp=4), SwiGLU width
    1376 (≈ 8/3·h, divisible by 4), vocab 512. ``"throughput"``: the ``small`` preset (h=256, 4 layers).
    ``"quick"``: the ``debug`` preset.
    """
    from lightning_tp.models import get_config

    if name in ("activations", "comm"):
        base = get_config("debug", hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                          intermediate_size=1376, vocab_size=512, num_hidden_layers=2, max_position_embeddings=1024)
    elif name == "throughput":
        base = get_config("small")
    elif name == "quick":
        base = get_config("debug")
    else:
        base = get_config(name)
    return base.replace(**overrides) if overrides else base


def paired_summary(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Medians of two paired series and the median of the per-pair ratios ``a[i] / b[i]``."""
    if len(a) != len(b) or not a:
        raise BenchmarkError(f"paired runs need equal, non-empty series; got {len(a)} and {len(b)}")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"median_a": statistics.median(a), "median_b": statistics.median(b),
            "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
            "pairs": len(ratios)}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (what the docs page embeds)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the numbers were taken."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, load average {load:.1f} at start; torch {torch.__version__},"
            f" Python {platform.python_version()}")
