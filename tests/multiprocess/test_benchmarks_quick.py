"""Smoke test of the benchmark harness (``python -m benchmarks``) in its quickest mode.

One launch runs every CPU benchmark at tp=2 on two ranks with tiny sizes; the assertions check the
properties the harness exists to show (collective counts at the Megatron minimum, bytes equal to the
Megatron figure, activation bytes equal to the hand-derived Llama accounting and below Korthikanti's
recompute formulas, every ratio printed), not the speed. The single-device path is
``tests/unit/test_benchmarks_smoke.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from launching import QUIET, launch_env
from paths import ROOT

pytestmark = pytest.mark.multiprocess


def test_all_cpu_benchmarks_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = launch_env(**QUIET)
    command = [sys.executable, "-m", "benchmarks", "all", "--quick", "--world", "2", "--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        # One launch in about 20 exited non-zero on the loaded 2-core machine (ranks on a freshly picked port);
        # a crash of the harness, not a wrong number, so it gets one more launch, and its output is kept visible.
        import warnings

        warnings.warn(f"benchmark launch exited {proc.returncode}, retrying once:\n{proc.stderr[-3000:]}",
                      RuntimeWarning, stacklevel=1)
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
