"""Multi-process worker for the reliability tests: ``python tests/workers/faults.py SPEC.json``.

Launched like the other workers (Lightning's launcher re-runs this script for ranks 1..N-1); one launch runs
its ``runs`` one after the other in one process group. Every rank writes what it sees to plain files as it
goes, so that a job that is killed still leaves a record:

* ``<root>/<run>/rank<r>.pid``: the rank's process id, written when fitting starts;
* ``<root>/<run>/rank<r>.jsonl``: one line per optimizer step, ``{"step", "loss", "dp_rank", "ids"}`` (``ids``:
  the input token ids of this rank's batch), flushed before the next step begins;
* ``<root>/<run>/rank<r>.error``: ``"<type>: <message>"`` of an exception that ended this rank's ``fit``;
* ``<root>/<run>/fault``: ``time.time()`` when the fault was injected.

SPEC: ``{"root", "corpus", "devices", "timeout_s", "runs": [run, ...]}`` where run is
``{"name", "dp", "tp", "max_steps", "every"?: save <root>/<name>/last every N steps, "ckpt"?: path under root to
resume from, "fault"?: fault}`` and fault is ``{"kind", "rank", "step"}`` with kind

* ``"raise"``: ``training_step`` of global rank ``rank`` raises at ``step`` (1-based optimizer step);
* ``"bad_record"``: the training sample that data-parallel rank ``rank`` reads first at ``step`` is malformed:
  reading it raises ``DataError`` in whichever process reads it (the sampler gives it to that dp rank only);
* ``"pause"``: after ``step``, global rank ``rank`` sleeps (a hung rank; the test may kill it);
* ``"kill_in_save"``: global rank ``rank`` writes its shard of the checkpoint of ``step`` into the staging
  directory, then kills itself with SIGKILL before the save completes.

The collective timeout is ``TensorParallelStrategy(timeout=timedelta(seconds=timeout_s))``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tp import CausalLMModule, TensorParallelStrategy
from lightning_tp.data.pretrain import PretrainDataModule
from lightning_tp.data.samplers import ResumableDistributedSampler
from lightning_tp.errors import DataError

GLOBAL_BATCH, SEQ_LEN, TOTAL_STEPS = 4, 16, 12


def mark_fault(fault: dict[str, Any]) -> None:
    """``<fault["dir"]>/fault``: when the fault was injected (``time.time()``), for the test's time-to-exit."""
    Path(fault["dir"], "fault").write_text(repr(time.time()))


class FaultyModule(CausalLMModule):
    """``CausalLMModule("debug")`` whose ``training_step`` can raise on one rank."""

    def __init__(self, fault: dict[str, Any] | None) -> None:
        super().__init__("debug", init_seed=7, lr=1e-3, warmup_steps=2, max_steps=TOTAL_STEPS)
        self.fault = fault or {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if (self.fault.get("kind") == "raise" and self.global_rank == self.fault["rank"]
                and self.trainer.global_step + 1 == self.fault["step"]):
            mark_fault(self.fault)
            raise RuntimeError(f"injected fault: rank {self.global_rank} failed in training_step at step"
                               f" {self.fault['step']}")
        return super().training_step(batch, batch_idx)


class MalformedAt:
    """A dataset whose sample ``bad`` cannot be read, like a corrupt record in a shard of the corpus."""

    def __init__(self, dataset: Any, bad: int, fault: dict[str, Any]) -> None:
        self.dataset, self.bad, self.fault = dataset, bad, fault

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index == self.bad:
            mark_fault(self.fault)
            raise DataError(f"injected fault: training sample {index} is malformed")
        return self.dataset[index]


class FaultyData(PretrainDataModule):
    """The pretraining data module with, for ``bad_record``, one malformed training sample."""

    def __init__(self, fault: dict[str, Any] | None, dp: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fault, self.dp = fault or {}, dp

    def setup(self, stage: str | None = None) -> None:
        fresh = self.train_dataset is None
        super().setup(stage)
        if fresh and self.fault.get("kind") == "bad_record":
            # The same order the training sampler of that data-parallel rank will deal (seed, epoch 0).
            order = list(ResumableDistributedSampler(self.train_dataset, num_replicas=self.dp,
                                                     rank=self.fault["rank"], seed=self.seed))
            bad = order[(self.fault["step"] - 1) * self.batch_size]
            self.train_dataset = MalformedAt(self.train_dataset, bad, self.fault)  # type: ignore[assignment]


class Recorder(L.Callback):
    """Writes the pid, then one line per step, to ``<dir>/rank<r>.*``; pauses or self-kills when told."""

    def __init__(self, out: Path, fault: dict[str, Any] | None) -> None:
        self.out, self.fault = out, fault or {}
        self.file: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        (self.out / f"rank{rank}.pid").write_text(str(os.getpid()))
        self.file = open(self.out / f"rank{rank}.jsonl", "a")  # noqa: SIM115 - closed in teardown
        if self.fault.get("kind") == "kill_in_save" and rank == self.fault["rank"]:
            _kill_while_saving(self.fault, trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mesh = trainer.strategy.device_mesh
        line = {"step": trainer.global_step, "loss": float(outputs["loss"].detach()),
                "dp_rank": mesh["data_parallel"].get_local_rank(), "ids": batch["input_ids"].tolist()}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if (self.fault.get("kind") == "pause" and trainer.global_rank == self.fault["rank"]
                and trainer.global_step == self.fault["step"]):
            mark_fault(self.fault)
            time.sleep(600)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _kill_while_saving(fault: dict[str, Any], trainer: L.Trainer) -> None:
    """Let this rank write its shard of the checkpoint of ``fault["step"]`` into the staging directory, then die."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    step = fault["step"]
    original = dcp_fs.FileSystemWriter.write_data

    def write_then_die(self: Any, plan: Any, planner: Any) -> Any:
        result = original(self, plan, planner)
        if trainer.global_step == step:
            result.wait()
            mark_fault(fault)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dcp_fs.FileSystemWriter.write_data = write_then_die


def fit(run: dict[str, Any], spec: dict[str, Any]) -> None:
    root = Path(spec["root"])
    out = root / run["name"]
    out.mkdir(parents=True, exist_ok=True)
    fault = {**run["fault"], "dir": str(out)} if run.get("fault") else None
    callbacks: list[L.Callback] = [Recorder(out, fault)]
    if run.get("every"):
        saver = ModelCheckpoint(dirpath=str(out), filename="step-{step}", save_top_k=0, save_last=True,
                                every_n_train_steps=run["every"])
        saver.CHECKPOINT_NAME_LAST, saver.FILE_EXTENSION = "last", ""  # as the recipes configure it
        callbacks.append(saver)
    strategy = TensorParallelStrategy(data_parallel_size=run["dp"], tensor_parallel_size=run["tp"],
                                      timeout=timedelta(seconds=spec["timeout_s"]))
    trainer = L.Trainer(
        accelerator="cpu", devices=spec["devices"], strategy=strategy, max_steps=run["max_steps"],
        num_sanity_val_steps=0, limit_val_batches=0, logger=False, enable_checkpointing=bool(run.get("every")),
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    data = FaultyData(fault, run["dp"], path=spec["corpus"], seq_len=SEQ_LEN, batch_size=GLOBAL_BATCH // run["dp"],
                      val_fraction=0.05, cache_dir=str(root / "cache"))
    ckpt = str(root / run["ckpt"]) if run.get("ckpt") else None
    try:
        trainer.fit(FaultyModule(fault), datamodule=data, ckpt_path=ckpt)
    except BaseException as e:
        (out / f"rank{trainer.global_rank}.error").write_text(f"{type(e).__name__}: {e}")
        raise


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    for run in spec["runs"]:
        fit(run, spec)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
