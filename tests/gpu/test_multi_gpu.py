"""The multi-GPU checks on one node: nccl with tp >= 2 (and the 2D mesh from 4 GPUs), async TP fusing its collectives
with the matmuls, float8 with FSDP2 over GPUs and float8 with TP refused. Skipped below 2 visible CUDA devices.

One launch of ``torchrun --standalone --nproc-per-node=N tests/gpu/multi_gpu_worker.py OUT`` with N = the visible
GPUs (at most ``GPU_CHECK_WORLD``, default 8; N is rounded down to a power of 2 so that tp divides the 4 KV heads of
the ``debug`` model or replicates them); the tests assert on what it reports. On an 8-GPU node:
``pytest -m gpu tests/gpu/test_multi_gpu.py`` (about 2-3 minutes, most of it compiling the async-TP runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from gpu_bounds import FLOAT8_LOSS_REL, NCCL_FP32_LOSS_REL
from launching import launch_env
from tolerances import LOSS_REL

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).resolve().parent / "multi_gpu_worker.py"


def _world() -> int:
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = min(visible, int(os.environ.get("GPU_CHECK_WORLD", "8")))
    return 1 << (world.bit_length() - 1) if world >= 2 else world


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    world = _world()
    if world < 2:
        pytest.skip(f"multi-GPU checks need >= 2 CUDA devices; {world} visible here")
    out = tmp_path_factory.mktemp("multi_gpu") / "out.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world}", str(WORKER), str(out)],
                          env=launch_env(PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def case(report: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    found = [c for c in report["cases"] if c["name"].startswith(prefix)]
    assert found, [c["name"] for c in report["cases"]]
    for c in found:
        if c["status"] == "skip":
            pytest.skip(f"{c['name']}: {c['reason']}")
        assert c["status"] == "ran", c.get("error")
    return found


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_nccl_tp_matches_one_gpu(report: dict[str, Any], record_property: Any) -> None:
    """fp32, SP + loss parallel + FSDP2 at (1, N) and (2, N/2): the mean over data-parallel ranks of each step's loss
    within ``NCCL_FP32_LOSS_REL`` of one GPU trained on the same global batches; tensor-parallel ranks agree exactly."""
    ref, worst = report["ref_losses"], 0.0
    for c in case(report, "nccl"):
        per_rank, tp = c["losses"], c["tp"]
        for rank, losses in enumerate(per_rank):
            assert losses == per_rank[rank - rank % tp], (c["name"], rank)  # the TP group's first rank
        dp_ranks = per_rank[::tp]
        mean = [sum(step) / len(step) for step in zip(*dp_ranks, strict=True)]
        assert len(mean) == len(ref) > 0
        worst = max(worst, *(rel(a, b) for a, b in zip(mean, ref, strict=True)))
    record_property("key", f"loss rel. err. vs one GPU {worst:.1e} (bound {NCCL_FP32_LOSS_REL:.0e})")
    assert worst <= NCCL_FP32_LOSS_REL


def test_async_tp_fuses_collectives_with_matmuls(report: dict[str, Any], record_property: Any) -> None:
    """``async_tp=True`` (with ``compile=True``, bf16-mixed): inductor's micro-pipeline pass put fused all-gather +
    matmul and matmul + reduce-scatter ops in the compiled blocks, and the losses stay within bf16's bound of the
    same compiled run without it."""
    (c,) = case(report, "async TP")
    fused = c["fused_ops"]
    gathers = sum(n for op, n in fused.items() if "fused_all_gather_matmul" in op)
    scatters = sum(n for op, n in fused.items() if "fused_matmul_reduce_scatter" in op)
    worst = max(rel(a, b) for ours, ref in zip(c["losses"], c["ref_losses"], strict=True)
                for a, b in zip(ours, ref, strict=True))
    record_property("key", f"{gathers} all-gather-matmul + {scatters} matmul-reduce-scatter fused, loss rel. err."
                           f" {worst:.1e}")
    assert gathers > 0 and scatters > 0, fused
    assert worst <= LOSS_REL["bf16-mixed"], (c["losses"], c["ref_losses"])


def test_float8_with_fsdp2_over_gpus_trains_close_to_bf16(report: dict[str, Any], record_property: Any) -> None:
    """float8 at (N, 1), FSDP2 over N GPUs: every rank's losses within ``FLOAT8_LOSS_REL`` of the bf16 run."""
    (c,) = case(report, f"float8 ({report['world']}, 1)")
    worst = max(rel(a, b) for ours, ref in zip(c["losses"], c["ref_losses"], strict=True)
                for a, b in zip(ours, ref, strict=True))
    record_property("key", f"loss rel. err. vs bf16 {worst:.1e} (bound {FLOAT8_LOSS_REL:.0e})")
    assert worst <= FLOAT8_LOSS_REL, (c["losses"], c["ref_losses"])


def test_float8_with_tp_is_refused_before_training(report: dict[str, Any], record_property: Any) -> None:
    """float8 at (1, N): refused by the strategy (``UnsupportedFeatureError``, raised when the Trainer is built,
    before any step) with a message that names ``tensor_parallel_size``: torchao's float8 linears are applied per
    block before TP, and the plan's styles do not shard them (docs/performance.md, "GPU tier")."""
    (c,) = case(report, f"float8 (1, {report['world']})")
    record_property("key", c["message"][:80])
    assert c["refused"] and "tensor_parallel_size" in c["message"], c
