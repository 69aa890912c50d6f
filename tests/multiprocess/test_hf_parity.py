"""transformers models under tensor parallelism, 2 and 4 CPU processes (tests/workers/hf_parity.py).

References are single-process transformers models with the same weights; see the worker's docstring.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _ci_deps import require
from launching import launch_env
from paths import WORKERS
from tolerances import FP32

require("transformers")
pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "hf_parity.py"


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def result(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"hf{request.param}") / "out.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(out), str(request.param)], env=launch_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())


def test_transformers_llama_trained_by_the_trainer_matches_one_process(result):
    run = result["trainer"]
    assert len(run["losses"]) == len(run["ref_losses"]) == 4
    worst = max(abs(ours - theirs) / abs(theirs) for ours, theirs in zip(run["losses"], run["ref_losses"], strict=True))
    print(f"\nhf trainer run: loss rel err {worst:.1e}, grad abs err {max(run['grad_err'].values()):.1e}")
    assert worst <= FP32.loss_rel
    assert len(run["grad_err"]) == 21 and max(run["grad_err"].values()) <= FP32.grad_abs


@pytest.mark.parametrize("name", ["hf-llama", "hf-llama-tied", "native-llama", "native-llama-tied", "hf-mistral",
                                  "hf-qwen2", "hf-qwen3", "hf-llama-kv1", "native-llama-kv1", "hf-qwen2-kv2",
                                  "hf-qwen3-kv2", "hf-llama-q6-kv2", "native-llama-q6-kv2", "hf-qwen2-q6-kv2"])
def test_logits_and_gradients_match_one_process(result, name):
    case = result["parity"][name]
    print(f"\n{name}: logits abs err {case['logits_err']:.1e}, grad abs err {case['grad_err']:.1e}")
    assert case["logits_err"] <= FP32.grad_abs, case  # logits: the same element-wise bound as gradients
    assert case["grad_err"] <= FP32.grad_abs, case
    assert case["grads_compared"] >= 20


def test_grid_logits_and_gradients_match_one_process(result):
    """2D tensor parallelism on transformers' Llama (tied and untied embeddings), Mistral, Qwen2 (q/k/v biases) and the
    native Llama: every gradient compared, at 1 × 2 and 2 × 1 grids (2 ranks) and 2 × 2 (4 ranks)."""
    cases = result["grid"]
    grids = {name.split("-")[0] for name in cases}
    assert grids in ({"1x2", "2x1"}, {"2x2"}), grids
    assert len(cases) == 4 * len(grids)
    for name, case in cases.items():
        print(f"\n{name}: logits abs err {case['logits_err']:.1e}, grad abs err {case['grad_err']:.1e}")
        assert case["logits_err"] <= FP32.grad_abs, (name, case)
        assert case["grad_err"] <= FP32.grad_abs, (name, case)
        assert case["grads_compared"] >= 20, (name, case)


def test_transformers_llama_collectives_equal_the_native_models(result):
    counts = result["comm_counts"]
    for layers in (1, 2):
        assert counts[f"hf/L={layers}"] == counts[f"native/L={layers}"]
    per_layer = {k: counts["hf/L=2"]["forward"][k] - counts["hf/L=1"]["forward"].get(k, 0)
                 for k in counts["hf/L=2"]["forward"]}
    assert {k: v for k, v in per_layer.items() if v} == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}


def test_hf_checkpoint_loads_into_tp_shards_reading_only_each_ranks_slices(tmp_path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4)
    ckpt = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(ckpt, max_shard_size="30MB")  # 84 MB in 3 files + index
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKERS / "hf_load.py"), str(ckpt), str(out)],
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["logits_err"] <= 1e-5
    largest_file = max(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    for rank in result["ranks"]:
        assert rank["local_param_bytes"] == pytest.approx(result["full_bytes"] / 2, rel=1e-3)  # 1/tp of the weights
        # Loading allocates at most one tensor beyond the shards; mapped file pages stay within one file.
        assert rank["anon_peak_bytes"] <= result["largest_tensor_bytes"], (rank, result["largest_tensor_bytes"])
        assert rank["rss_peak_bytes"] <= largest_file + result["largest_tensor_bytes"], (rank, largest_file)
