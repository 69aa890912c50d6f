"""Real multi-process CPU (gloo) runs through ``L.Trainer``: numerics parity, data layout, accumulation,
mixed precision, collective counts and a simulated two-node launch.

Each launch runs ``tests/workers/parity.py`` as a user script (Lightning spawns the other ranks) and
several Trainer configurations inside it, so the Lightning import is paid once per launch. The
reference is an independent single-process computation (plain ``Llama`` + ``torch.optim.AdamW`` +
``torch.nn.utils.clip_grad_norm_``) on the same data split.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
from launching import QUIET, launch_env
from paths import WORKERS
from tolerances import FP32, LOSS_REL, SGD_PARAM_ABS, assert_losses_close, assert_max_err

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "parity.py"
CLIP, CLIP_VALUE = 0.5, 0.01  # keep in sync with the worker
N_LLAMA = 3 + 9 * 2  # embed, lm_head, norm + 9 per layer
FLAGS = [{"sp": sp, "lp": lp} for sp, lp in product((True, False), (True, False))]
CASES_4 = [{"dp": 2, "tp": 2, **f} for f in FLAGS] + [{"dp": 1, "tp": 4, **f} for f in FLAGS] + [
    {"dp": 2, "tp": 2, "sp": True, "lp": True, "accumulate": 2},
    {"dp": 2, "tp": 2, "sp": True, "lp": True, "precision": "bf16-mixed"},
    {"dp": 2, "tp": 2, "sp": True, "lp": True, "ac": "selective"},
    # the block inputs kept as sequence shards and gathered again in backward (lightning_tp/parallel/sharded_saves.py)
    {"dp": 2, "tp": 2, "sp": True, "lp": True, "sharded": True},
] + [
    # Mixed meshes: the Llama on the (dp, tp) mesh plus an extra head the plan leaves out (FSDP2 puts it on the dp
    # mesh only; with fsdp=False it stays a plain tensor). Norm clipping with SGD, so parameters track gradients;
    # value clipping with AdamW. Also the never-trained options reshard_after_forward=False and fsdp=False.
    {"dp": 2, "tp": 2, "sp": True, "lp": True, "head": True, "clip": "norm", "optim": "sgd", "reshard": False},
    {"dp": 2, "tp": 2, "sp": True, "lp": False, "head": True, "clip": "value"},
    {"dp": 1, "tp": 4, "sp": True, "lp": True, "head": True, "clip": "norm", "optim": "sgd", "fsdp": False},
    {"dp": 1, "tp": 4, "sp": False, "lp": True, "head": True, "clip": "value"},
    # 2D tensor parallelism (lightning_tp/parallel/grid.py): a 2 × 2 grid, and 2 × 1 grids under 2 FSDP2 replicas
    {"dp": 1, "tp": [2, 2], "sp": True, "lp": True},
    {"dp": 2, "tp": [2, 1], "sp": True, "lp": False},
]
CASES_2 = [{"dp": 1, "tp": 2, **f} for f in FLAGS] + [
    {"dp": 1, "tp": 2, "sp": True, "lp": True, "ac": "full"},
    {"dp": 1, "tp": 2, "sp": False, "lp": True, "ac": "selective"},
    # true half precision (parameters, optimizer and compute in the dtype), against the fp32 reference; on 2 ranks
    # (FSDP2 still applies at dp=1), where a case costs half the CPU time of a 4-rank one
    {"dp": 1, "tp": 2, "sp": True, "lp": True, "precision": "bf16-true"},
    {"dp": 1, "tp": 2, "sp": True, "lp": True, "precision": "16-true"},
    # a 1 × 2 grid (the hidden dimension split, the sequence whole) with full activation checkpointing; a 2 × 1 grid
    # without FSDP2 (the norm weights' partial gradients reduced by the optimizer step's DTensor ops)
    {"dp": 1, "tp": [1, 2], "sp": True, "lp": True, "ac": "full"},
    {"dp": 1, "tp": [2, 1], "sp": True, "lp": True, "fsdp": False},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, name: str, spec: dict, env: dict[str, str] | None = None) -> subprocess.Popen:
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(WORKER), str(tmp / f"{name}.out.json"), str(tmp / f"{name}.json")],
                            env=env or launch_env(**QUIET), stdout=log, stderr=subprocess.STDOUT)


def _result(tmp: Path, name: str, proc: subprocess.Popen, timeout: int = 600) -> dict:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    out = tmp / f"{name}.out.json"
    if rc != 0 or not out.exists():
        log = (tmp / f"{name}.log").read_text()
        pytest.fail(f"worker {name} exited with {rc}:\n{log[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """All launches, started together where the machine allows, each awaited once."""
    tmp = tmp_path_factory.mktemp("mp")
    results = {}
    world4 = _launch(tmp, "world4", {"devices": 4, "cases": CASES_4, "comm_counts": True, "causal_lm": True})
    results["world4"] = _result(tmp, "world4", world4)
    world2 = _launch(tmp, "world2", {"devices": 2, "cases": CASES_2, "checkpoint_across_modes": str(tmp)})
    results["world2"] = _result(tmp, "world2", world2)
    port = str(_free_port())
    spec = {"devices": 2, "num_nodes": 2, "cases": [{"sp": True, "lp": True}]}
    nodes = [_launch(tmp, f"node{r}", spec, launch_env(**QUIET, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                       NODE_RANK=str(r)))
             for r in (0, 1)]
    results["two_node"] = _result(tmp, "node0", nodes[0])
    nodes[1].wait(timeout=120)
    assert nodes[1].returncode == 0, (tmp / "node1.log").read_text()[-4000:]
    return results


def _cases(runs: dict[str, dict]) -> list[dict]:
    return [c for key in ("world4", "world2") for c in runs[key]["cases"] if c.get("precision") is None]


def _label(c: dict) -> str:
    extra = "".join(f" {k}={c[k]}" for k in ("head", "clip", "optim", "fsdp", "reshard", "precision", "sharded")
                    if k in c)
    return (f"dp={c['dp']} tp={c['tp']} sp={c['sp']} lp={c['lp']} acc={c.get('accumulate', 1)}"
            f" ac={c.get('ac', 'none')}{extra}")


def _mixed(runs: dict[str, dict]) -> list[dict]:
    cases = [c for c in runs["world4"]["cases"] if c.get("head")]
    assert {(c["dp"], c["tp"], c["clip"]) for c in cases} == {(d, t, k) for d, t in ((2, 2), (1, 4))
                                                              for k in ("norm", "value")}
    return cases


def test_loss_equals_single_process(runs):
    for case in _cases(runs):
        for rank in case["ranks"]:
            assert_losses_close(rank["losses"], case["ref_losses"][str(rank["dp_rank"])], FP32.loss_rel,
                                (_label(case), rank["rank"]))


def test_gradients_equal_single_process(runs):
    """Gradients after clipping (recorded in ``configure_gradient_clipping``) and before (the Recorder)."""
    for case in _cases(runs):
        assert len(case["grad_abs_err"]) == N_LLAMA + 2 * bool(case.get("head")), _label(case)  # all compared
        assert_max_err(case["grad_abs_err"], FP32.grad_abs, _label(case))
        assert_max_err(case["unclipped_grad_abs_err"], FP32.grad_abs, _label(case))


def test_parameters_after_five_clipped_steps(runs):
    for case in _cases(runs):
        if case.get("clip", "norm") == "norm":
            assert case["ref_grad_norm"] > CLIP, "clipping must be active for this test to mean anything"
            assert case["ref_clipped_norm"] == pytest.approx(CLIP, rel=1e-5)
        assert case["grad_norm"] == pytest.approx(case["ref_grad_norm"], rel=FP32.norm_rel), _label(case)
        # SGD: parameter error = lr x the gradient errors; AdamW amplifies them (see tolerances.py)
        bound = SGD_PARAM_ABS if case.get("optim") == "sgd" else FP32.param_abs
        assert_max_err(case["param_abs_err"], bound, _label(case))


def test_mixed_mesh_parameters_live_where_the_test_says(runs):
    """The premise of the clipping cases: Llama and head on different meshes (or the head a plain tensor)."""
    for case in _mixed(runs):
        for rank in case["ranks"]:
            meshes = rank["param_meshes"]
            head = "Parameter" if case.get("fsdp") is False else "DTensor('data_parallel',)"
            llama = "DTensor('tensor_parallel',)" if case.get("fsdp") is False else \
                "DTensor('data_parallel', 'tensor_parallel')"
            assert meshes.pop("head.weight") == meshes.pop("head.bias") == head, (_label(case), rank["rank"])
            assert set(meshes.values()) == {llama}, (_label(case), set(meshes.values()))


def test_mixed_mesh_norm_clipping_equals_torch(runs):
    """Mesh-aware norm over parameters on different meshes = torch's single-process clip_grad_norm_; a norm that
    counts the head's replicated copies more than once, or skips reducing a per-mesh partial norm, is far off."""
    for case in _mixed(runs):
        # the head carries ~half of the squared norm, so a miscounted head moves the norm by >10%
        assert case["ref_head_norm"] ** 2 > 0.3 * case["ref_grad_norm"] ** 2, _label(case)
        assert case["grad_norm"] == pytest.approx(case["ref_grad_norm"], rel=FP32.norm_rel), _label(case)
        if case["clip"] == "norm":
            assert case["ref_grad_norm"] > 4 * CLIP, _label(case)  # clipping scales every gradient by < 1/4
            assert_max_err(case["grad_abs_err"], FP32.grad_abs, _label(case))  # after clipping


def test_mixed_mesh_value_clipping_equals_torch(runs):
    for case in _mixed(runs):
        if case["clip"] != "value":
            continue
        assert case["ref_grad_absmax"] > 10 * CLIP_VALUE, _label(case)  # clipping is active
        assert case["clipped_absmax"] == pytest.approx(CLIP_VALUE, rel=1e-6), _label(case)
        assert_max_err(case["grad_abs_err"], FP32.grad_abs, _label(case))  # after clipping
        assert_max_err(case["param_abs_err"], FP32.param_abs, _label(case))


def test_each_dp_group_sees_its_own_batch(runs):
    for case in _cases(runs):
        by_dp: dict[int, list] = {}
        for rank in case["ranks"]:
            by_dp.setdefault(rank["dp_rank"], []).append(rank["batches"])
        for dp_rank, seen in by_dp.items():
            assert all(b == seen[0] for b in seen), f"{_label(case)}: TP ranks of dp group {dp_rank} saw different data"
        firsts = [seen[0] for seen in by_dp.values()]
        assert len(firsts) == case["dp"]
        if case["dp"] > 1:
            assert firsts[0] != firsts[1], f"{_label(case)}: dp groups saw the same batches"


def test_loss_parallel_keeps_logits_vocab_sharded(runs):
    for case in _cases(runs):
        types = {t for rank in case["ranks"] for t in rank["logits_types"]}
        if case["lp"]:
            assert types == {"DTensor(Shard(dim=2),)/torch.float32"}, (_label(case), types)
        else:
            assert types == {"Tensor/torch.float32"}, (_label(case), types)


def test_gradient_accumulation_skips_fsdp_sync(runs):
    (case,) = [c for c in runs["world4"]["cases"] if c.get("accumulate") == 2]
    for rank in case["ranks"]:
        calls = rank["sync_calls"]
        assert calls[0::2] == [0] * (len(calls) // 2), calls  # non-final micro-batches: no reduce-scatter
        assert all(c == 3 for c in calls[1::2]), calls  # final: one per FSDP unit (2 blocks + model root)


def test_bf16_mixed_computes_in_bf16(runs):
    (case,) = [c for c in runs["world4"]["cases"] if c.get("precision") == "bf16-mixed"]
    types = {t for rank in case["ranks"] for t in rank["logits_types"]}
    assert types == {"DTensor(Shard(dim=2),)/torch.bfloat16"}
    for rank in case["ranks"]:
        assert_losses_close(rank["losses"], case["ref_losses"][str(rank["dp_rank"])], LOSS_REL["bf16-mixed"])


@pytest.mark.parametrize("precision, dtype", [("bf16-true", "bfloat16"), ("16-true", "float16")])
def test_true_half_precision_trains_close_to_fp32(runs, precision, dtype):
    """Parameters, optimizer state and compute in the half dtype; losses within the stated bound of the fp32
    single-process reference (tests/tolerances.py), every rank, all five steps."""
    (case,) = [c for c in runs["world2"]["cases"] if c.get("precision") == precision]
    types = {t for rank in case["ranks"] for t in rank["logits_types"]}
    assert types == {f"DTensor(Shard(dim=2),)/torch.{dtype}"}, types
    for rank in case["ranks"]:
        assert rank["param_dtypes"] == [f"torch.{dtype}"]
        assert_losses_close(rank["losses"], case["ref_losses"][str(rank["dp_rank"])], LOSS_REL[precision],
                            (precision, rank["rank"]))
    assert case["grad_norm"] == pytest.approx(case["ref_grad_norm"], rel=LOSS_REL[precision])


def _diff(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0)}


def test_collective_counts_reach_the_megatron_minimum(runs):
    counts = runs["world4"]["comm_counts"]

    def per_layer(key: str, phase: str) -> dict:
        return _diff(counts[f"{key}/L=1"][phase], counts[f"{key}/L=2"][phase])

    # TP only: 2 all-reduces forward (o_proj, down_proj), 2 backward (attention and MLP input grads).
    assert per_layer("llama/sp=False/lp=False", "forward") == {"all_reduce": 2}
    assert per_layer("llama/sp=False/lp=False", "backward") == {"all_reduce": 2}
    # TP + SP: 2 all-gathers + 2 reduce-scatters, forward and backward.
    for key in ("llama/sp=True/lp=False", "llama/sp=True/lp=True"):
        assert per_layer(key, "forward") == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
        assert per_layer(key, "backward") == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    # The per-projection baseline reduces the input gradient once per projection: 3 (q, k, v) + 2 (gate, up).
    assert per_layer("llama_per_projection/sp=False/lp=False", "backward") == {"all_reduce": 5}
    # Outside the layers (1-layer model minus its layer): forward, the embedding's all-reduce, lm_head's
    # all-gather and loss parallel's 3 small all-reduces (the logits are never gathered); backward, lm_head's
    # reduce-scatter and the all-gather where the sequence is split on entry to the first block.
    one = counts["llama/sp=True/lp=True/L=1"]
    assert one["forward"] == {"all_gather_into_tensor": 3, "reduce_scatter_tensor": 2, "all_reduce": 4}
    assert one["backward"] == {"all_gather_into_tensor": 3, "reduce_scatter_tensor": 3}
    assert counts["llama/sp=True/lp=False/L=1"]["forward"]["all_gather_into_tensor"] == 4  # + the logits gather


def test_grid_collectives_per_layer(runs):
    """A 2 × 2 grid's layer: forward, the all-gather over the rows of each block's input (2), the reduce-scatters
    over the columns of q, k, v, gate and up (5), the all-gathers over the columns of o_proj's and down_proj's
    inputs (2), their reduce-scatters over the rows (2) and each norm's statistics all-reduce over the columns (2);
    backward, each of those reversed (all-gather <-> reduce-scatter), the norms' second all-reduce, no more."""
    counts = runs["world4"]["comm_counts"]
    per_layer = {phase: _diff(counts["grid/L=1"][phase], counts["grid/L=2"][phase])
                 for phase in ("forward", "backward")}
    assert per_layer["forward"] == {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 7, "allreduce_": 2}
    assert per_layer["backward"] == {"all_gather_into_tensor": 7, "reduce_scatter_tensor": 4, "allreduce_": 2}


def test_grid_parameters_live_on_the_grid(runs):
    """The premise of the 2D cases: the decoder's parameters on (data_parallel, tp_row, tp_col), the embedding and
    lm_head on the flattened TP mesh, and every rank in one TP group of r·c ranks."""
    grids = [c for c in _cases(runs) if isinstance(c["tp"], list)]
    assert {tuple(c["tp"]) for c in grids} == {(2, 2), (2, 1), (1, 2)}
    assert any(c.get("fsdp") is False for c in grids)
    for case in grids:
        dp = "" if case.get("fsdp") is False else "'data_parallel', "  # FSDP2 adds the data-parallel mesh dim
        for rank in case["ranks"]:
            meshes = rank["param_meshes"]
            flat = {k for k, v in meshes.items() if v == f"DTensor({dp}'tensor_parallel'{',' if not dp else ''})"}
            assert flat == {"model.embed_tokens.weight", "lm_head.weight"}, (_label(case), meshes)
            assert {v for k, v in meshes.items() if k not in flat} == {f"DTensor({dp}'tp_row', 'tp_col')"}
            assert len(rank["tp_group"]) == case["tp"][0] * case["tp"][1]


def test_two_nodes_auto_sizes_keep_tp_inside_a_node(runs):
    (case,) = runs["two_node"]["cases"]
    ranks = case["ranks"]
    assert len(ranks) == 4
    node_of = {r["rank"]: r["node_rank"] for r in ranks}
    assert sorted(node_of.values()) == [0, 0, 1, 1]
    for r in ranks:
        assert r["sizes"] == [2, 2]  # dp = number of nodes, tp = devices per node
        assert {node_of[m] for m in r["tp_group"]} == {r["node_rank"]}, r
    assert_losses_close(ranks[0]["losses"], case["ref_losses"]["0"], FP32.loss_rel)


def test_cpu_init_by_the_strategy_equals_single_process_init(runs):
    """The CPU path (full init on every rank, then shard): dropping the pre-shard init repeats shards and fails
    here. The GPU path (each rank initialises its own shards) is tests/unit/test_models.py's `gpu` test."""
    init = runs["world4"]["init"]
    assert init["n"] == N_LLAMA
    assert max(init["max_abs_err"].values()) == 0.0  # same seed, same numbers, whatever the sharding


def test_causal_lm_module_logs_through_the_strategy(runs):
    result = runs["world4"]["causal_lm"]
    m = result["metrics"]
    for key in ("train/loss", "train/ppl", "val/loss", "val/ppl", "perf/tokens_per_sec", "perf/step_time"):
        assert key in m, sorted(m)
    # against values computed outside the module: the unmasked labels each replica was fed, and a float64
    # single-process loss of the trained weights on the batches of the last validation
    assert result["steps"] == [6, 6]
    assert m["train/tokens"] == result["expected_tokens_last_step"] < result["tokens_per_step"]
    assert m["train/tokens_seen"] == result["expected_tokens_seen"]
    assert result["val_tokens"] > 0
    assert m["val/loss"] == pytest.approx(result["expected_val_loss"], rel=FP32.loss_rel)
    assert m["val/ppl"] == pytest.approx(math.exp(result["expected_val_loss"]), rel=FP32.loss_rel)
    # Tokens per optimizer step count each data-parallel replica once: dp × micro-batch × seq, not × tp too.
    assert m["perf/tokens_per_sec"] * m["perf/step_time"] == pytest.approx(result["tokens_per_step"], rel=1e-3)


def test_activation_checkpointing_keeps_parameter_names(runs):
    keys = {tuple(r["state_dict_keys"]) for c in _cases(runs) if not c.get("head") for r in c["ranks"]}
    assert len(keys) == 1 and len(next(iter(keys))) == N_LLAMA, keys
    assert {c.get("ac", "none") for c in _cases(runs)} == {"none", "full", "selective"}  # all modes took part


def test_checkpoint_saved_with_one_mode_resumes_with_another(runs):
    result = runs["world2"]["checkpoint_across_modes"]
    uninterrupted = result["uninterrupted"]
    assert len(uninterrupted) == 4 and len({round(x, 4) for x in uninterrupted}) == 4  # the losses move
    assert len(result["first"]) == 2 and len(result["plain"]) == len(result["selective_compiled"]) == 2
    assert_losses_close(result["first"], uninterrupted[:2], FP32.loss_rel, result)
    for resumed in ("plain", "selective_compiled"):
        assert_losses_close(result[resumed], uninterrupted[2:], FP32.loss_rel, (resumed, result))


def test_activation_checkpointing_collectives(runs):
    counts = runs["world4"]["comm_counts"]

    def per_layer(key: str, phase: str) -> dict:
        return _diff(counts[f"{key}/L=1"][phase], counts[f"{key}/L=2"][phase])

    sp = "llama/sp=True/lp=True"
    for ac in ("selective", "full"):
        assert per_layer(f"{sp}/ac={ac}", "forward") == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    # Selective keeps reduce-scatter outputs and recomputes the two all-gathers of the sequence-sharded norm
    # outputs instead of storing them at full size (Megatron's choice too): +2 all-gathers in backward.
    assert per_layer(f"{sp}/ac=selective", "backward") == {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 2}
    # Full recomputes the forward with its collectives, up to the last tensor backward needs (down_proj's input):
    # the MLP's final reduce-scatter is not repeated.
    assert per_layer(f"{sp}/ac=full", "backward") == {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 3}
    # TP only: all-reduce outputs are kept, so selective adds no collective at all.
    assert per_layer("llama/sp=False/lp=False/ac=selective", "backward") == {"all_reduce": 2}
