"""LoRA under tensor parallelism against single-process PEFT (issue 16).

Two launches side by side (``tests/workers/lora.py``), each a user's LightningModule holding
``peft.get_peft_model(LlamaForCausalLM, LoraConfig(...))`` trained by ``TensorParallelStrategy()`` with its
defaults (SP, loss parallel, FSDP2) and AdamW, checkpointed after the first epoch and resumed from it:

* 4 ranks: (dp, tp) = (2, 2) on 8 query / 4 KV heads; (1, 4) resumed from the (2, 2) checkpoint (resharding);
  (1, 4) on SmolLM2's 9 query / 3 KV heads (uneven query heads, KV heads selected per rank).
* 2 ranks: (1, 2) on 9:3, also without FSDP2; (1, 2) without SP and loss parallel; (2, 1); (1, 2) on Phi-3, whose
  fused qkv_proj / gate_up_proj keep grouped rows that lora_B follows; the collectives per layer with and without
  LoRA, and one epoch under ``bf16-mixed``.

Checked against the same PEFT model trained in one process on the same samples: the loss of every step on every
rank, every adapter gradient element at every step; the frozen base bit-identical before and after, without
gradients or optimizer state, left out of FSDP2; the checkpoint adapters and optimizer state only. The final
checkpoints are exported (``--adapters``, ``--merged``) and loaded by PEFT and transformers with the trained
model's logits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import launch_spec, worker_output
from paths import WORKERS
from tolerances import assert_max_err

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "lora.py"
TOL = 1e-5  # the bound, on losses and on every adapter gradient element
CASES_4 = [{"name": "(2,2)", "dp": 2, "tp": 2, "model": "8:4"},
           {"name": "(1,4) from (2,2)", "dp": 1, "tp": 4, "model": "8:4", "resume_from": "(2,2)"},
           {"name": "(1,4)", "dp": 1, "tp": 4, "model": "9:3"}]
CASES_2 = [{"name": "(1,2)", "dp": 1, "tp": 2, "model": "9:3"},
           # the other paths the adapters' gradients take: no FSDP2 (the optimizer step reduces the replicated
           # factors' partial gradients), TP without SP and loss parallel, data parallelism alone
           {"name": "(1,2) no FSDP2", "dp": 1, "tp": 2, "model": "9:3", "strategy": {"fsdp": False}},
           {"name": "(1,2) TP only", "dp": 1, "tp": 2, "model": "8:4",
            "strategy": {"sequence_parallel": False, "loss_parallel": False}},
           {"name": "(2,1)", "dp": 2, "tp": 1, "model": "8:4"},
           {"name": "(1,2) Phi-3", "dp": 1, "tp": 2, "model": "phi3"}]  # fused qkv / gate_up: 4 adapted per layer
ADAPTERS = {"8:4": 28, "9:3": 28, "phi3": 16}  # 2 layers x 7 (Phi-3: 4 fused) projections x (A, B)


def _launch(tmp: Path, name: str, spec: dict) -> subprocess.Popen:
    return launch_spec(WORKER, tmp, name, spec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("peft")
    tmp = tmp_path_factory.mktemp("lora")
    start = time.perf_counter()
    procs = {"world4": _launch(tmp, "world4", {"devices": 4, "dir": str(tmp), "cases": CASES_4}),
             "world2": _launch(tmp, "world2", {"devices": 2, "dir": str(tmp), "cases": CASES_2,
                                               "collectives": True, "bf16": True})}
    out = {name: worker_output(proc, tmp / f"{name}.out.json", tmp / f"{name}.log", f"worker {name}")
           for name, proc in procs.items()}
    print(f"\nLoRA launches took {time.perf_counter() - start:.1f} s")
    return {"dir": tmp, "cases": out["world4"]["cases"] + out["world2"]["cases"],
            "collectives": out["world2"]["collectives"], "bf16": out["world2"]["bf16"]}


def test_losses_and_adapter_gradients_equal_single_process_peft(runs: dict) -> None:
    for case in runs["cases"]:
        worst = max(abs(a - ref[rank["dp_rank"]]) for rank in case["ranks"]
                    for a, ref in zip(rank["losses"], case["ref_losses"], strict=True))
        print(f"LoRA {case['name']} {case['model']}: loss err {worst:.1e}, worst adapter gradient element"
              f" {max(case['grad_err']):.1e} (of |g| up to {case['grad_absmax']:.1e}), {case['seconds']} s")
        assert len(case["ranks"][0]["losses"]) == len(case["ref_losses"]) > 0
        assert worst <= TOL, case["name"]
        assert_max_err({f"step {i + 1}": e for i, e in enumerate(case["grad_err"])}, TOL,
                       f"{case['name']}: adapter gradients")
        assert case["adapters"] == ADAPTERS[case["model"]]


def test_frozen_base_is_untouched_and_holds_no_training_state(runs: dict) -> None:
    for case in runs["cases"]:
        assert case["base_identical"], case["name"]
        for rank in case["ranks"]:
            assert rank["frozen_grads"] == 0 and rank["frozen_with_state"] == 0, case["name"]
            assert rank["trainable_with_state"] == ADAPTERS[case["model"]], case["name"]
            # FSDP2 shards what trains; the frozen base is sharded by TP alone
            fsdp, tp = case.get("strategy", {}).get("fsdp", True), case["tp"] > 1
            assert rank["frozen_meshes"] == (["('tensor_parallel',)"] if tp else []), case["name"]
            trained = "('data_parallel', 'tensor_parallel')" if tp else "('data_parallel',)"
            assert rank["trained_meshes"] == ([trained] if fsdp else ["('tensor_parallel',)"]), case["name"]
    assert runs["bf16"]["frozen_dtypes"] == ["torch.bfloat16"]
    assert runs["bf16"]["trained_dtypes"] == ["torch.float32"]


def test_checkpoint_holds_adapters_and_optimizer_state_only(runs: dict) -> None:
    for case in runs["cases"]:
        if "checkpoint" not in case:
            continue  # resumed from another case's
        ckpt, adapters = case["checkpoint"], ADAPTERS[case["model"]]
        assert len(ckpt["model_keys"]) == adapters
        assert all(".lora_A." in k or ".lora_B." in k for k in ckpt["model_keys"]), ckpt["model_keys"][:3]
        print(f"LoRA {case['name']} checkpoint: {ckpt['tensor_bytes']} tensor bytes (adapters"
              f" {ckpt['adapter_bytes']} + optimizer state) against {ckpt['full_model_bytes']} for the full model;"
              f" {ckpt['bytes']} on disk")
        # weights + AdamW's two moments of the adapters, and a step count per parameter
        assert ckpt["tensor_bytes"] <= 3 * ckpt["adapter_bytes"] + 8 * adapters


def test_collectives_per_layer_equal_the_model_without_lora(runs: dict) -> None:
    for model, counts in runs["collectives"].items():
        print(f"LoRA collectives per layer at tp 2, {model}: with {counts['lora']}, without {counts['base']}")
        for phase in ("forward", "backward"):
            lora = {k: v for k, v in counts["lora"][phase].items() if v}
            base = {k: v for k, v in counts["base"][phase].items() if v}
            assert lora == base, (model, phase)
        assert counts["lora"]["forward"]["all_gather_into_tensor"] == 2  # the SP minimum, not zero by accident


def test_exported_adapters_load_in_peft_and_the_merged_model_in_transformers(runs: dict, tmp_path: Path) -> None:
    """``lightning-tp export --adapters`` / ``--merged`` of each final checkpoint (written at tp 2 and 4, the 9:3
    layouts with their head-selected projections included): PEFT's and transformers' own loaders give the trained
    model's logits."""
    import peft
    import torch
    import transformers

    sys.path.insert(0, str(WORKERS))
    import lora as worker

    from lightning_tp.checkpoint.adapters import export_adapters

    bases = {}
    for model in {case["model"] for case in runs["cases"]}:
        bases[model] = tmp_path / f"base-{model}"
        worker.build(model, lora=False).save_pretrained(bases[model])  # the frozen base every case started from
    for case in runs["cases"]:
        ckpt, base = runs["dir"] / f"{case['name']}-final", bases[case["model"]]
        trained = torch.tensor(case["logits"])
        export_adapters(ckpt, tmp_path / case["name"] / "adapters", base=base)
        loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                tmp_path / case["name"] / "adapters")
        export_adapters(ckpt, tmp_path / case["name"] / "merged", merged=True, base=base)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / case["name"] / "merged")
        ids = worker.samples()[:1, :-1]
        with torch.no_grad():
            errors = {"adapters": float((loaded(input_ids=ids).logits - trained).abs().max()),
                      "merged": float((merged(input_ids=ids).logits - trained).abs().max())}
        print(f"LoRA {case['name']} export: logits against the trained model {errors}")
        assert_max_err(errors, TOL, case["name"])
