"""Smoke tests of the benchmark harness (``python -m benchmarks``) in its quickest mode.

One launch runs every CPU benchmark at tp=2 on two ranks with tiny sizes; the assertions check the
properties the harness exists to show (collective counts at the Megatron minimum, bytes equal to the
Megatron figure, activation bytes equal to the hand-derived Llama accounting and below Korthikanti's
recompute formulas, every ratio printed), not the speed. The single-device (GPU) path is run on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import ROOT

REPO = ROOT
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.mark.multiprocess
def test_all_cpu_benchmarks_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "benchmarks", "all", "--quick", "--world", "2", "--json", str(out)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        # One launch in about 20 exited non-zero on the loaded 2-core machine (ranks on a freshly picked port);
        # a crash of the harness, not a wrong number, so it gets one more launch, and its output is kept visible.
        import warnings

        warnings.warn(f"benchmark launch exited {proc.returncode}, retrying once:\n{proc.stderr[-3000:]}",
                      RuntimeWarning, stacklevel=1)
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads(out.read_text())

    comm = {row["case"]: row for row in r["comm"]["rows"]}
    for case in ("ours tp+sp", "ours tp"):
        assert comm[case]["at_minimum"], comm[case]
        assert comm[case]["elements"] == pytest.approx(comm[case]["megatron_elements"])
    # the baseline reduces the input gradient once per colwise projection: 3 (q, k, v) + 2 (gate, up)
    assert comm["per-projection tp"]["per_layer"]["backward"] == {"all_reduce": 5}
    assert not comm["per-projection tp"]["at_minimum"]
    assert comm["per-projection tp"]["elements"] / comm["ours tp"]["elements"] == pytest.approx((2 + 5) / (2 + 2))

    rows = r["activations"]["rows"]
    assert {(row["case"], row["tp"]) for row in rows} >= {("tp+sp", 2), ("tp+sp+selective", 2), ("none", 1)}
    for row in rows:
        if row["saved"] is not None:  # two independent counts agree where both exist
            assert row["held"] == row["saved"], row
        assert row["held"] == pytest.approx(row["llama_formula"], rel=0.02), row
        if "selective" in row["case"] or "full" in row["case"]:
            assert row["held"] <= row["korthikanti"], row
    sp = {row["case"]: row["held"] for row in rows if row["tp"] == 2}
    assert sp["tp+sp+full"] < sp["tp+sp+selective"] < sp["tp+sp"] < sp["tp"]

    for name, a, b in (("vs_stock", "ours", "stock"), ("efficiency", "tp2", "tp1")):
        res = r[name]
        assert len(res[a]) == len(res[b]) == res["pairs"] == 1
        assert all(math.isfinite(x) and x > 0 for x in res[a] + res[b])
        assert res["median_ratio"] == pytest.approx(res[a][0] / res[b][0])
    for text in ("= minimum", "held / Korthikanti", "ours/stock =", "TP efficiency (median of per-pair ratios)"):
        assert text in proc.stdout, text


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
