"""Checkpoints of ``TensorParallelStrategy`` across real launches: exact resume, resharding, consolidation into one
file, crash-safe saving. The single-process checks of the same code are ``tests/unit/checkpoint/test_checkpoints.py``.

The tests share three launches of ``tests/workers/checkpoint.py`` (gloo, CPU), each running several Trainers in one
process group:

* A, dp=2 × tp=2: an uninterrupted 6-step run; a run stopped after 3 steps (``ModelCheckpoint`` → ``a/last``); a run
  resumed from ``a/last`` to step 6 that saves ``b/last`` after every step; the single file Lightning writes with
  ``save_distributed_checkpoint=False``; then failures injected into saves of ``b/last``.
* ``a/last`` is consolidated into ``a.ckpt`` here, in the test process (no process group), by the CLI.
* B, world 4: ``a/last`` resumed at (dp, tp) = (1, 4) and (4, 1); ``a.ckpt`` resumed at (2, 2) and (1, 4).
* C, world 2: ``a/last`` resumed at (1, 2); an incomplete directory refused; a swap interrupted between its two
  renames recovered.
* 2D tensor parallelism: A also saves a 2 × 2 grid's run after 3 steps (``g/last``), C resumes it at tp 2 (1D), and B
  resumes the 1D ``a/last`` on a 2 × 2 grid.

The global batch is constant (per-rank ``batch_size = 4 / dp``), so every layout trains on the same samples and the
global loss (mean over data-parallel ranks) of steps 4 and 5 must match the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _ci_deps import require
from launching import QUIET, launch_env, write_corpus
from paths import WORKERS

from lightning_tp.checkpoint.consolidate import consolidate

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "checkpoint.py"
RESUME_TOL, RESHARD_TOL = 1e-6, 1e-5
# Issue 14's layouts in a checkpoint: 9 query heads (5 + 4 at tp 2, 3 + 2 + 2 + 2 at tp 4), 3 KV heads (replicated at
# both), tied embeddings, and the byte tokenizer's 259-row vocabulary (130 + 129, 65 + 65 + 65 + 64).
ODD = {"vocab_size": 259, "hidden_size": 72, "intermediate_size": 96, "num_attention_heads": 9,
       "num_key_value_heads": 3, "head_dim": 8, "tie_word_embeddings": True}


def _launch(root: Path, name: str, spec: dict) -> dict:
    spec = {"root": str(root), "corpus": str(root / "corpus.txt"), **spec}
    (root / f"{name}.json").write_text(json.dumps(spec))
    out, log = root / f"{name}.out.json", root / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(WORKER), str(out), str(root / f"{name}.json")],
                              env=launch_env(**QUIET), stdout=f, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker {name} exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    write_corpus(root / "corpus.txt")
    start = time.perf_counter()
    a = _launch(root, "A", {"devices": 4, "runs": [
        {"name": "full", "dp": 2, "tp": 2, "max_steps": 6},
        {"name": "stop3", "dp": 2, "tp": 2, "max_steps": 3, "save_dir": "a", "every": 3},
        {"name": "odd full", "dp": 2, "tp": 2, "max_steps": 5, "model": ODD},
        {"name": "odd stop3", "dp": 2, "tp": 2, "max_steps": 3, "model": ODD, "save_dir": "odd", "every": 3},
        {"name": "resume", "dp": 2, "tp": 2, "max_steps": 6, "ckpt": "a/last", "save_dir": "b", "every": 1},
        {"name": "grid stop3", "dp": 1, "tp": [2, 2], "max_steps": 3, "save_dir": "g", "every": 3},
    ], "weights": [{"run": "stop3", "file": "weights3.pt"}, {"run": "odd stop3", "file": "odd3.pt"}],
        "full_file": {"run": "stop3", "file": "lightning3.ckpt"},
        "faults": [
        {"name": "meta on rank 0", "path": "b/last", "where": "meta", "ranks": [0]},
        {"name": "shards on rank 1", "path": "b/last", "where": "dcp", "ranks": [1]},
        {"name": "shards on all ranks", "path": "b/last", "where": "dcp", "ranks": [0, 1, 2, 3]},
    ]})
    from lightning_tp import cli

    cli.main(["consolidate", str(root / "a" / "last"), str(root / "a.ckpt")])
    cli.main(["consolidate", str(root / "odd" / "last"), str(root / "odd.ckpt")])
    cli.main(["export", str(root / "odd" / "last"), str(root / "odd_hf")])
    b = _launch(root, "B", {"devices": 4, "runs": [
        {"name": "odd (1,4)", "dp": 1, "tp": 4, "max_steps": 5, "model": ODD, "ckpt": "odd/last"},
        {"name": "(1,4)", "dp": 1, "tp": 4, "max_steps": 5, "ckpt": "a/last"},
        {"name": "(4,1)", "dp": 4, "tp": 1, "max_steps": 5, "ckpt": "a/last"},
        {"name": "file (2,2)", "dp": 2, "tp": 2, "max_steps": 5, "ckpt": "a.ckpt"},
        {"name": "file (1,4)", "dp": 1, "tp": 4, "max_steps": 5, "ckpt": "a.ckpt"},
        {"name": "1D to grid (2,2)", "dp": 1, "tp": [2, 2], "max_steps": 5, "ckpt": "a/last"},
    ]})
    # An incomplete directory (shards without meta.pt) and a swap interrupted between its renames (only last.old).
    shutil.copytree(root / "a" / "last", root / "partial" / "last", ignore=shutil.ignore_patterns("meta.pt"))
    shutil.copytree(root / "a" / "last", root / "swap" / "last.old")
    c = _launch(root, "C", {"devices": 2, "runs": [
        {"name": "(1,2)", "dp": 1, "tp": 2, "max_steps": 5, "ckpt": "a/last"},
        {"name": "odd (1,2)", "dp": 1, "tp": 2, "max_steps": 5, "model": ODD, "ckpt": "odd/last"},
        {"name": "incomplete", "dp": 1, "tp": 2, "max_steps": 5, "ckpt": "partial/last", "expect_error": True},
        {"name": "interrupted swap", "dp": 1, "tp": 2, "max_steps": 4, "ckpt": "swap/last"},
        {"name": "grid to 1D (1,2)", "dp": 1, "tp": 2, "max_steps": 5, "ckpt": "g/last"},
    ]})
    runs = {"root": root, **{k: v for r in (a, b, c) for k, v in r["runs"].items()}, "faults": a["faults"]}
    print(f"\ncheckpoint launches took {time.perf_counter() - start:.1f} s")
    print(_differences(runs))
    return runs


def _differences(runs: dict) -> str:
    """What the tolerances below are measured against (printed with ``-s``; docs/reliability.md quotes it)."""
    full, resumed = _by_rank(runs["full"]), _by_rank(runs["resume"])
    resume = max(abs(loss - full[rank][s]) for rank, losses in resumed.items() for s, loss in losses.items())
    reshard = {name: max(abs(runs[name]["global_losses"][s] - runs["full"]["global_losses"][s])
                         for s in runs[name]["global_losses"])
               for name in ("(1,4)", "(4,1)", "(1,2)", "file (2,2)", "file (1,4)", "interrupted swap",
                            "1D to grid (2,2)", "grid to 1D (1,2)")}
    reshard.update({name: max(abs(runs[name]["global_losses"][s] - runs["odd full"]["global_losses"][s])
                              for s in runs[name]["global_losses"]) for name in ("odd (1,4)", "odd (1,2)")})
    return (f"resumed at the same layout vs uninterrupted, worst |loss difference| on any rank: {resume:.1e}"
            f" (allowed {RESUME_TOL:g})\nresharded / from the consolidated file vs uninterrupted, worst |global loss"
            f" difference| (allowed {RESHARD_TOL:g}): " + ", ".join(f"{k} {v:.1e}" for k, v in reshard.items()))


def _by_rank(run: dict) -> dict[int, dict[str, float]]:
    return {i: rank["losses"] for i, rank in enumerate(run["ranks"])}


def test_resume_continues_exactly(runs: dict) -> None:
    """Model, optimizer, LR schedule, loop counters and data position restored: steps 4-6 match on every rank."""
    full, stopped, resumed = (_by_rank(runs[k]) for k in ("full", "stop3", "resume"))
    for rank, losses in full.items():
        assert sorted(stopped[rank]) == ["1", "2", "3"] and sorted(resumed[rank]) == ["4", "5", "6"]
        for step in ("1", "2", "3"):
            assert stopped[rank][step] == losses[step]
        worst = max(abs(resumed[rank][s] - losses[s]) for s in ("4", "5", "6"))
        assert worst <= RESUME_TOL, (rank, resumed[rank], losses)
    assert runs["resume"]["ranks"][0]["global_step"] == 6
    # the losses move: a resume that replayed steps 1-3, or kept the warm-up learning rate, would not match
    assert len({round(v, 4) for v in runs["full"]["global_losses"].values()}) == 6


@pytest.mark.parametrize("layout", ["(1,4)", "(4,1)", "(1,2)"])
def test_reshard_matches_the_uninterrupted_run(runs: dict, layout: str) -> None:
    full, run = runs["full"]["global_losses"], runs[layout]
    dp, tp = (int(x) for x in layout.strip("()").split(","))
    assert len({rank["dp_rank"] for rank in run["ranks"]}) == dp and len(run["ranks"]) == dp * tp
    assert sorted(run["global_losses"]) == ["4", "5"]
    for step in ("4", "5"):  # step 5 also depends on the optimizer state and learning rate after resharding
        assert abs(run["global_losses"][step] - full[step]) <= RESHARD_TOL, (layout, step, run["global_losses"], full)


def test_grid_checkpoints_reshard_to_and_from_1d(runs: dict) -> None:
    """2D tensor parallelism (a 2 × 2 grid) trains the first 3 steps as the 1D run does, and its checkpoint resumes at
    tp 2 (1D), as the 1D checkpoint resumes on the grid: steps 4 and 5 as uninterrupted."""
    full = runs["full"]["global_losses"]
    grid = runs["grid stop3"]["global_losses"]
    assert sorted(grid) == ["1", "2", "3"]
    assert all(abs(grid[s] - full[s]) <= RESHARD_TOL for s in grid), (grid, full)
    for name in ("1D to grid (2,2)", "grid to 1D (1,2)"):
        run = runs[name]["global_losses"]
        assert sorted(run) == ["4", "5"], name
        assert all(abs(run[s] - full[s]) <= RESHARD_TOL for s in run), (name, run, full)


def test_consolidated_file_is_lightnings_single_file_format(runs: dict) -> None:
    root = runs["root"]
    ours = torch.load(root / "a.ckpt", weights_only=True)
    lightning = torch.load(root / "lightning3.ckpt", weights_only=True)  # save_distributed_checkpoint=False
    for key in ("epoch", "global_step", "loops", "lr_schedulers", "callbacks", "hyper_parameters",
                "datamodule_hyper_parameters", "PretrainDataModule", "optimizer_states", "state_dict"):
        assert key in ours, key
    assert set(lightning) <= set(ours), set(lightning) - set(ours)
    assert ours["global_step"] == 3 and ours["PretrainDataModule"]["consumed"] == 6
    assert ours["lr_schedulers"][0]["last_epoch"] == 3
    assert ours["state_dict"].keys() == lightning["state_dict"].keys()
    for name, tensor in lightning["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), name
    (mine,), (theirs,) = ours["optimizer_states"], lightning["optimizer_states"]
    assert list(mine["state"]) == list(theirs["state"]) and all(isinstance(k, int) for k in mine["state"])
    assert mine["param_groups"] == theirs["param_groups"]
    for pid, state in theirs["state"].items():
        assert state.keys() == mine["state"][pid].keys()
        for k, v in state.items():
            assert torch.equal(mine["state"][pid][k], v), (pid, k)


def test_consolidated_weights_load_into_a_plain_llama(runs: dict) -> None:
    from lightning_tp import Llama, get_config

    state = torch.load(runs["root"] / "a.ckpt", weights_only=True)["state_dict"]
    model = Llama(get_config("debug"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    trained = torch.load(runs["root"] / "weights3.pt", weights_only=True)  # gathered in the worker after step 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


@pytest.mark.parametrize("layout", ["file (2,2)", "file (1,4)"])
def test_training_resumes_from_the_consolidated_file(runs: dict, layout: str) -> None:
    full, run = runs["full"]["global_losses"], runs[layout]
    for step in ("4", "5"):
        assert abs(run["global_losses"][step] - full[step]) <= RESHARD_TOL, (layout, step)


@pytest.mark.parametrize("fault", ["meta on rank 0", "shards on rank 1", "shards on all ranks"])
def test_a_failed_save_keeps_the_last_complete_checkpoint(runs: dict, fault: str) -> None:
    result = runs["faults"][fault]
    path = str(runs["root"] / "b" / "last")
    assert all(e and e.startswith("CheckpointError") and path in e for e in result["errors"]), result["errors"]
    assert "injected" in result["errors"][0]
    assert result["siblings"] == ["last"]  # no staging directory left, no backup left
    assert result["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "meta.pt"]
    assert result["global_step"] == 6  # the step-6 checkpoint of the resumed run, saved by swapping (steps 4, 5, 6)


def test_checkpoint_after_failed_saves_is_loadable(runs: dict, tmp_path: Path) -> None:
    out = consolidate(runs["root"] / "b" / "last", tmp_path / "b.ckpt")
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["global_step"] == 6 and len(checkpoint["state_dict"]) == 21


def test_incomplete_directory_is_refused_and_an_interrupted_swap_recovered(runs: dict) -> None:
    error = runs["incomplete"]["error"]
    assert error.startswith("CheckpointError") and str(runs["root"] / "partial" / "last") in error, error
    assert "meta.pt" in error
    assert all(rank["error"] == error for rank in runs["incomplete"]["ranks"])
    recovered = runs["interrupted swap"]
    assert abs(recovered["global_losses"]["4"] - runs["full"]["global_losses"]["4"]) <= RESHARD_TOL
    assert sorted(p.name for p in (runs["root"] / "swap").iterdir()) == ["last"]


@pytest.mark.parametrize("layout", ["odd (1,4)", "odd (1,2)"])
def test_uneven_heads_and_vocabulary_reshard_exactly(runs: dict, layout: str) -> None:
    """Saved at (2, 2) with 9 query heads as 5 + 4, replicated KV heads and 259 vocabulary rows as 130 + 129; resumed
    at tp 4 (3 + 2 + 2 + 2 heads, 65 + 65 + 65 + 64 rows) and at tp 2 without FSDP: steps 4 and 5 as uninterrupted."""
    full, run = runs["odd full"]["global_losses"], runs[layout]
    assert sorted(run["global_losses"]) == ["4", "5"]
    for step in ("4", "5"):
        assert abs(run["global_losses"][step] - full[step]) <= RESHARD_TOL, (layout, step, run["global_losses"], full)


def test_uneven_layouts_consolidate_and_export_with_the_models_own_shapes(runs: dict) -> None:
    """The consolidated file holds the model's shapes (259 rows, whole 9-head projections) and equals the weights
    gathered in the run; transformers loads the export with logits equal to the plain Llama's."""
    transformers = require("transformers")
    from lightning_tp import Llama, LlamaConfig

    state = {k.removeprefix("model."): v for k, v in torch.load(runs["root"] / "odd.ckpt",
                                                                weights_only=True)["state_dict"].items()}
    model = Llama(LlamaConfig(**ODD))
    model.load_state_dict(state, strict=True)
    assert state["model.embed_tokens.weight"].shape == (259, 72)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (72, 72)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (24, 72)
    trained = torch.load(runs["root"] / "odd3.pt", weights_only=True)  # gathered in the worker after step 3
    assert len(trained) == len(dict(model.named_parameters())) == 20  # lm_head is the (tied) embedding
    for name, tensor in trained.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    theirs = transformers.AutoModelForCausalLM.from_pretrained(runs["root"] / "odd_hf").eval()
    tokens = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = float((theirs(tokens).logits - model.eval()(tokens)).abs().max())
    assert err <= 1e-5, err
