"""Smoke tests of the benchmark harness's single-device (GPU) path, run on the CPU. The launch of every CPU
benchmark in its quickest mode is ``tests/multiprocess/test_benchmarks_quick.py``.
"""

from __future__ import annotations

import math
import sys

import pytest
from paths import ROOT

REPO = ROOT
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_single_device_path_runs_on_cpu() -> None:
    from benchmarks.throughput import measure_single_device, report_single_device

    r = measure_single_device(device="cpu", preset="debug", batch=2, seq=16, steps=2, warmup=1, compile=False,
                              activation_checkpointing="selective")
    assert r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"])
    assert r["mfu"] is None  # no peak FLOP/s for a CPU
    assert "tokens/s" in report_single_device(r)


def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    import torch

    from benchmarks.throughput import measure_single_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="--device cuda"):
        measure_single_device(device="cuda", preset="debug", batch=1, seq=8, steps=1, warmup=1)
