"""Smoke test of the benchmark harness (``python -m benchmarks``) in its quickest mode.

One launch runs every CPU benchmark at tp=2 on two ranks with tiny sizes; the assertions check the
properties the harness exists to show (collective counts at the Megatron minimum, bytes equal to the
Megatron figure, activation bytes equal to the hand-derived Llama accounting and below Korthikanti's
recompute formulas, LoRA's per-rank bytes equal to its adapters' sharding and its activation collectives
per layer equal to full fine-tuning's, every ratio printed), not the speed. The single-device path is
``tests/unit/test_benchmarks_smoke.py``.
"""

from __future__ import annotations

import importlib.util
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
        if any(mode in row["case"] for mode in ("selective", "full", "sharded")):
            assert row["held"] <= row["korthikanti"], row
    sp = {row["case"]: row["held"] for row in rows if row["tp"] == 2}
    assert sp["tp+sp+full"] < sp["tp+sp+selective"] < sp["tp+sp+sharded"] < sp["tp+sp"] < sp["tp"]
    # save_sharded_inputs: the two gathered projection inputs kept as their shard, 2·(2 bytes)·s·b·h·(1 − 1/t) less,
    # for 2 more all-gathers in backward, and the gradients of tp+sp exactly
    act = r["activations"]
    assert sp["tp+sp"] - sp["tp+sp+sharded"] == 2 * 2 * act["seq"] * act["batch"] * act["hidden"] // 2
    layer = {row["case"]: row["per_layer"] for row in rows if row["tp"] == 2}
    assert layer["tp+sp+sharded"]["forward"] == layer["tp+sp"]["forward"] == {"all_gather_into_tensor": 2,
                                                                              "reduce_scatter_tensor": 2}
    assert layer["tp+sp"]["backward"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    assert layer["tp+sp+sharded"]["backward"] == {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 2}
    assert next(row for row in rows if row["case"] == "tp+sp+sharded")["grad_max_abs_diff"] == 0.0

    for name, a, b in (("vs_stock", "ours", "stock"), ("efficiency", "tp2", "tp1")):
        res = r[name]
        assert len(res[a]) == len(res[b]) == res["pairs"] == 1
        assert all(math.isfinite(x) and x > 0 for x in res[a] + res[b])
        assert res["median_ratio"] == pytest.approx(res[a][0] / res[b][0])
    for text in ("= minimum", "held / Korthikanti", "ours/stock =", "TP efficiency (median of per-pair ratios)"):
        assert text in proc.stdout, text
    if importlib.util.find_spec("peft") is None:
        assert "lora: skipped" in proc.stdout
    else:
        check_lora(r["lora"])
        assert "per-pair ratios LoRA/full =" in proc.stdout


def adapter_elements_per_rank(r: dict) -> int:
    """Adapter elements one rank holds if each follows its base: beside a column-parallel projection ``A``
    (r × in) replicated and ``B`` (out × r) split by rows; beside a row-parallel one ``A`` split by columns and
    ``B`` replicated."""
    h, i, t, k = r["hidden"], r["intermediate"], r["tp"], r["lora_rank"]
    q, kv = r["heads"] * r["head_dim"], r["kv_heads"] * r["head_dim"]
    column = [(h, q), (h, kv), (h, kv), (h, i), (h, i)]  # (in, out): q, k, v, gate, up
    row = [(q, h), (i, h)]  # o, down
    return r["layers"] * (sum(k * n_in + n_out // t * k for n_in, n_out in column)
                          + sum(k * n_in // t + n_out * k for n_in, n_out in row))


def check_lora(r: dict) -> None:
    assert len(r["lora"]) == len(r["full"]) == r["pairs"] == 1
    assert all(math.isfinite(x) and x > 0 for x in r["lora"] + r["full"])
    assert r["median_ratio"] == pytest.approx(r["lora"][0] / r["full"][0])
    assert len(r["memory_per_rank"]) == r["tp"]
    for memory in r["memory_per_rank"]:
        lora, full = memory["lora"][-1]["held"], memory["full"][-1]["held"]
        assert lora["trainable_params"] == 4 * adapter_elements_per_rank(r)  # fp32
        assert lora["grads"] == lora["trainable_params"]
        assert lora["optimizer_state"] == pytest.approx(2 * lora["trainable_params"], rel=0.01)  # AdamW's moments
        assert lora["frozen_grads"] == lora["frozen_optimizer_state"] == 0
        assert lora["frozen_params"] == full["trainable_params"] and full["frozen_params"] == 0
        assert all(m["peak_rss"] > 0 for side in ("lora", "full") for m in memory[side])
    layer = r["per_layer"]
    assert layer["lora"]["forward"] == layer["full"]["forward"] == {"all_gather_into_tensor": 2,
                                                                    "reduce_scatter_tensor": 2}
    for side, reduced in (("lora", len(r["targets"])), ("full", 2)):  # adapter factors / the two norm weights
        assert layer[side]["backward"] == {"all_gather_into_tensor": 2, "all_reduce": reduced,
                                           "reduce_scatter_tensor": 2}, side
        assert layer[side]["optimizer"] == {}
        assert layer[side]["saved_bytes"] > 0
    # the replicated factors: A (r × h) of q, k, v, gate, up and B (h × r) of o, down; all-reduce sends 2N(t−1)/t
    t, h, k = r["tp"], r["hidden"], r["lora_rank"]
    assert layer["lora"]["elements"]["all_reduce"] == pytest.approx(7 * k * h * 2 * (t - 1) / t)
    for op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        assert layer["lora"]["elements"][op] == layer["full"]["elements"][op]
