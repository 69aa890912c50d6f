"""End to end through the recipe scripts, 4 CPU processes: pretrain a few steps, then fine-tune from its
sharded checkpoint (every weight, and LoRA adapters at tp 2). Each run is a real `python recipes/NAME.py
overrides...` launch."""

from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from launching import launch_env
from paths import ROOT

pytestmark = pytest.mark.multiprocess

COMMON = ["model=debug", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
          "trainer.log_every_n_steps=1", "data.seq_len=96", "data.batch_size=4", "sample_tokens=4",
          "logger.tensorboard=false"]


def _run(recipe: str, overrides: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *overrides], cwd=cwd,
                          env=launch_env(**extra_env), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    proc = _run("pretrain", [*COMMON, "out_dir=out/pretrain", "data.max_bytes=200000",
                             f"data.cache_dir={work / 'cache'}"], work)
    (work / "pretrain.out").write_text(proc.stdout + proc.stderr)
    return work


def test_pretrain_writes_checkpoint_logs_and_summary(pretrained: Path) -> None:
    out = pretrained / "out" / "pretrain"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 4
    assert (out / "last" / ".metadata").is_file()  # the sharded checkpoint, complete
    steps = [step for step, _ in summary["val_loss_history"]]
    assert steps[0] == 0 and steps[-1] == 6  # the step-0 baseline, then the scheduled validations
    assert isinstance(summary["sample"], str)
    metrics_csv = list((out / "logs").rglob("metrics.csv"))
    assert metrics_csv and "train/loss" in metrics_csv[0].read_text().splitlines()[0]
    # The loss curve beside summary.json; summary.json keeps full precision, the printed line is rounded.
    assert summary["loss_curve"] == "out/pretrain/loss_curve.png"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (summary["sample_temperature"], summary["sample_top_k"], summary["sample_seed"]) == (0.8, 40, 0)
    printed = (pretrained / "pretrain.out").read_text()
    line = next(t for t in printed.splitlines() if t.startswith("[lightning-tp] 6 steps in "))
    first, last = (f"{v:.2f}" for _, v in (summary["val_loss_history"][0], summary["val_loss_history"][-1]))
    assert f"val loss {first} -> {last}" in line
    assert re.search(r"; [\d,]+ tokens/s$", line) and f"{summary['tokens_per_sec']:,.0f} tokens/s" in line
    assert re.search(r" in (\d+\.\d s|\d+ s|\d+ min \d+ s) on 4 processes \(dp=2 x tp=2\)", line)
    assert "[lightning-tp] sample (temperature 0.8, top-k 40, seed 0): 'def ' -> " in printed
    # Warnings of Lightning's and torch's own code that a user cannot act on are not printed.
    assert "LeafSpec" not in printed and "sequential all_gather" not in printed


@pytest.fixture(scope="module")
def finetuned(pretrained: Path) -> dict:
    _run("finetune", [*COMMON, f"checkpoint={pretrained / 'out' / 'pretrain' / 'last'}", "out_dir=out/finetune"],
         pretrained)
    return json.loads((pretrained / "out" / "finetune" / "summary.json").read_text())


def test_finetune_starts_from_the_pretrained_weights(pretrained: Path, finetuned: dict) -> None:
    pre = json.loads((pretrained / "out" / "pretrain" / "summary.json").read_text())
    _run("finetune", [*COMMON, "out_dir=out/scratch"], pretrained)
    tuned = finetuned
    scratch = json.loads((pretrained / "out" / "scratch" / "summary.json").read_text())
    assert (pretrained / "out" / "finetune" / "last" / ".metadata").is_file()
    # Loaded weights are not the random init: the step-0 validation loss differs from a scratch run's.
    assert tuned["val_loss_history"][0][1] != pytest.approx(scratch["val_loss_history"][0][1], rel=1e-4)
    assert pre["steps"] == 6 and tuned["steps"] == 6


def _instructions_as_a_hugging_face_dataset(directory: Path) -> None:
    """The embedded instruction set (what ``data=instructions`` reads) as a local ``datasets`` data directory, which
    ``datasets.load_dataset(directory, split="train")`` reads without the network."""
    import datasets

    from lightning_tp.data.instructions import make_default_dataset

    records = make_default_dataset()
    directory.mkdir(parents=True)
    datasets.Dataset.from_dict({k: [r[k] for r in records] for k in ("instruction", "output")}).to_parquet(
        str(directory / "train.parquet"))


def _tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = log_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def test_finetune_from_a_hugging_face_export_of_the_pretrained_checkpoint(pretrained: Path, finetuned: dict) -> None:
    """Export to Hugging Face files, then fine-tune from them on the same records read through ``datasets``
    (``data.hf_dataset``), logging to TensorBoard as well as CSV."""
    export = subprocess.run([sys.executable, "-m", "lightning_tp.cli", "export", "out/pretrain/last", "out/hf"],
                            cwd=pretrained, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    assert (pretrained / "out" / "hf" / "config.json").is_file()
    _instructions_as_a_hugging_face_dataset(pretrained / "hf_data")
    overrides = [o for o in COMMON if not o.startswith("logger.")]
    _run("finetune", [*overrides, "checkpoint=out/hf", "out_dir=out/from_hf", "logger.tensorboard=true",
                      f"data.hf_dataset={pretrained / 'hf_data'}", "data.hf_split=train"], pretrained,
         HF_HOME=str(pretrained / "hf_home"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = pretrained / "out" / "from_hf"
    from_hf = json.loads((out / "summary.json").read_text())
    # Same weights through two formats and the same records through two readers: every validation loss of the
    # run (step 0 and after training) equals the run from the sharded checkpoint on the embedded records.
    assert [s for s, _ in from_hf["val_loss_history"]] == [s for s, _ in finetuned["val_loss_history"]] == [0, 3, 6]
    for (_, ours), (_, theirs) in zip(from_hf["val_loss_history"], finetuned["val_loss_history"], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5), (from_hf["val_loss_history"], finetuned["val_loss_history"])
    # TensorBoard got the same train/loss values as the CSV logger, one per step.
    (metrics_csv,) = (out / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    from_csv = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    from_tb = _tensorboard_scalars(out / "tensorboard", "train/loss")
    assert sorted(from_tb) == sorted(from_csv) and len(from_tb) == 6, (from_tb, from_csv)
    for step, value in from_csv.items():
        assert from_tb[step] == pytest.approx(value, rel=1e-6), step


def _fails_before_spawning(overrides: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "finetune.py"), *COMMON, *overrides,
                           f"out_dir={cwd / 'out'}"], cwd=cwd, env=launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "Initializing distributed" not in proc.stdout + proc.stderr  # no rank was started
    return proc.stderr


def test_bad_checkpoint_fails_before_spawning(tmp_path: Path) -> None:
    err = _fails_before_spawning([f"checkpoint={tmp_path / 'nope'}"], tmp_path)
    assert "CheckpointError" in err and "nope" in err


def test_malformed_record_fails_before_spawning_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say hi"}\n')
    err = _fails_before_spawning(["data=alpaca", f"data.path={bad}"], tmp_path)
    assert f"{bad}:2" in err and "output" in err


def test_multirun_sweep_launches_each_job_with_its_own_ranks(tmp_path: Path) -> None:
    # Flags may sit between overrides, as users write them; each job gets its own ranks and directory.
    _run("pretrain", [*COMMON[:1], "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                      "data.seq_len=32", "data.max_bytes=100000", f"data.cache_dir={tmp_path / 'cache'}",
                      "sample_tokens=1", "logger=csv", "--multirun", "optimizer.lr=1e-3,3e-4"], tmp_path)
    summaries = sorted((tmp_path / "out" / "pretrain" / "multirun").rglob("summary.json"))
    assert len(summaries) == 2
    losses = []
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["steps"] == 2 and summary["world_size"] == 4
        assert (path.parent / "last" / ".metadata").is_file()
        losses.append(summary["val_loss_history"][-1][1])
    assert losses[0] != losses[1]  # different learning rates, different results


LORA = [*COMMON, "trainer.devices=2", "strategy.tensor_parallel_size=2", "peft=lora", "peft.rank=4", "peft.dropout=0"]


def _train_losses(out: Path) -> dict[int, float]:
    (metrics_csv,) = (out / "logs").rglob("metrics.csv")
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(metrics_csv.open()) if r.get("train/loss")}


def _val_loss_in_one_process(base: Path, adapters: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """The recipe's validation loss, recomputed in this process without any parallelism: the plain debug Llama with
    PEFT adapters, its base loaded from ``base`` and its adapters from the LoRA checkpoint ``adapters``, on the
    recipe's validation batches (the embedded instruction set, one data-parallel rank: its order as loaded)."""
    import torch.distributed.checkpoint as dcp
    from hydra.utils import instantiate

    from lightning_tp.checkpoint.weights import load_weights
    from lightning_tp.recipes.config import compose_recipe
    from lightning_tp.recipes.lora import lora_settings
    from lightning_tp.training.module import CausalLMModule

    cfg = compose_recipe("finetune", [o for o in LORA if not o.startswith(("trainer.devices", "strategy."))])
    data = instantiate(cfg.data, _convert_="all")
    data.prepare_data()
    data.setup("fit")
    module = CausalLMModule("debug", lora=lora_settings(cfg.peft, str(base)), init_seed=cfg.seed, max_steps=1)
    module.configure_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        load_weights(module, base)
        state = {k: v for k, v in module.state_dict().items() if ".lora_" in k}
        dcp.load({"state_dict": state}, checkpoint_id=str(adapters), no_dist=True)  # in place
    module.eval()
    total = tokens = 0
    with torch.no_grad():
        for batch in itertools.islice(data.val_dataloader(), cfg.trainer.limit_val_batches):
            loss, n = module.compute_loss(batch)
            total, tokens = total + loss.double() * n, tokens + n
    return float(total / tokens), state


def test_lora_trains_only_the_adapters_and_resumes(pretrained: Path) -> None:
    """``finetune peft=lora`` from the pretraining checkpoint at tp 2 for 3 steps, then resumed from its checkpoint to
    step 6: each checkpoint holds adapters and their optimizer state only, and the base it started from plus those
    adapters, in one process without TP, give the run's own last validation loss (so the base never changed and the
    adapters are the trained ones); the resumed run starts from the saved adapters, not from fresh ones."""
    from lightning_tp.checkpoint.safe_reading import read_checkpoint_metadata, read_meta
    from lightning_tp.checkpoint.weights import check_weights_fit
    from lightning_tp.errors import CheckpointError
    from lightning_tp.training.module import CausalLMModule

    base = pretrained / "out" / "pretrain" / "last"
    start = time.perf_counter()
    first = _run("finetune", [*LORA, f"checkpoint={base}", "trainer.max_steps=3", "out_dir=out/lora"], pretrained)
    _run("finetune", [*LORA, f"checkpoint={base}", "resume=out/lora/last", "out_dir=out/lora_resumed"], pretrained)
    print(f"\nLoRA recipe, 3 steps then resumed to 6, 2 ranks each: {time.perf_counter() - start:.0f} s")
    runs = {name: pretrained / "out" / name for name in ("lora", "lora_resumed")}
    summaries = {name: json.loads((out / "summary.json").read_text()) for name, out in runs.items()}
    assert [summaries[n]["steps"] for n in runs] == [3, 6]
    assert [s for s, _ in summaries["lora"]["val_loss_history"]] == [0, 3]
    assert [s for s, _ in summaries["lora_resumed"]["val_loss_history"]] == [6]  # no step-0 check when resuming
    counts = summaries["lora"]["parameters"]
    assert counts["trainable"] == 2 * 4 * (128 + 2 * 96 + 128 + 2 * 256 + 256)  # r (in + out) per projection
    assert f"[lightning-tp] LoRA rank 4: {counts['trainable']:,} of {counts['total']:,} parameters trained" in (
        first.stdout + first.stderr)
    for name, out in runs.items():
        keys = set(read_checkpoint_metadata(out / "last").state_dict_metadata)
        weights = {k for k in keys if k.startswith("state_dict.")}
        moments = {k for k in keys if k.startswith("optimizer_0.state.")}
        assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), name
        assert moments and all(".lora_" in k for k in moments), name
        layout = read_meta(out / "last")["lightning_tp"]
        assert layout["adapters_only"] and layout["peft"]["model"]["default"]["base_model_name_or_path"] == str(
            base.resolve())
        ours, adapters = _val_loss_in_one_process(base, out / "last")
        theirs = summaries[name]["val_loss_history"][-1][1]
        assert ours == pytest.approx(theirs, rel=1e-5), (name, ours, theirs)
        assert all(torch.count_nonzero(v) > 0 for k, v in adapters.items() if ".lora_B." in k), name  # B starts at 0
    # Lightning restarts the epoch of a loader without state, so the resumed run's first batch is the first run's
    # first: with the saved adapters its loss differs from the untrained model's (B = 0: the base alone, bit for bit)
    assert _train_losses(runs["lora_resumed"])[3] != _train_losses(runs["lora"])[0]
    # and an adapter-only checkpoint is no base to start from (the recipe refuses it before spawning)
    with pytest.raises(CheckpointError, match="holds LoRA adapters only"):
        check_weights_fit(CausalLMModule("debug"), runs["lora"] / "last")
