"""Multi-process worker for the checkpoint tests: ``python tests/workers/checkpoint.py OUT.json SPEC.json``.

Launched like ``tests/workers/parity.py``: Lightning's launcher re-runs this script for the other ranks and one
launch runs several Trainers in one process group. Every run trains a ``CausalLMModule("debug")`` on a
``PretrainDataModule`` with a constant global batch (per-rank ``batch_size = GLOBAL_BATCH / dp``) and records the
loss returned by ``training_step`` at every step on every rank. Global rank 0 writes the results.

SPEC: ``{"root": dir, "corpus": file, "runs": [run, ...], "faults": [fault, ...], "weights": {...}}`` where

* run: ``{"name", "dp", "tp", "max_steps", "model"?: CausalLMModule's model (default "debug"), "ckpt"?: path to
  resume from, "save_dir"?: ModelCheckpoint dirpath, "every"?: its every_n_train_steps, "expect_error"?: resuming
  must fail (the message is recorded)}``;
* fault: ``{"name", "path", "where": "meta" | "dcp", "ranks": [...]}``: ``trainer.save_checkpoint(path)`` with the
  last run's trainer, failing on ``ranks`` while writing meta.pt (rank 0 writes it) or the DCP shards;
* weights: ``{"run": name, "file": path}`` (or a list of them): rank 0 saves that run's final full weights (Llama
  keys) to ``file``;
* full_file: ``{"run": name, "file": path}``: after that run, ``trainer.save_checkpoint(file)`` with
  ``save_distributed_checkpoint=False``, i.e. the single file Lightning's ``ModelParallelStrategy`` writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tp import CausalLMModule, TensorParallelStrategy
from lightning_tp.data.pretrain import PretrainDataModule

GLOBAL_BATCH, SEQ_LEN, TOTAL_STEPS = 4, 16, 6


class LossRecorder(L.Callback):
    """``{global_step: loss}`` of this rank, from the loss ``training_step`` returned."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"].detach())


def make_trainer(run: dict[str, Any], world: int, root: Path, recorder: L.Callback) -> L.Trainer:
    callbacks: list[L.Callback] = [recorder]
    if run.get("save_dir"):
        saver = ModelCheckpoint(dirpath=str(root / run["save_dir"]), filename="step-{step}", save_top_k=0,
                                save_last=True, every_n_train_steps=run.get("every", 3))
        saver.CHECKPOINT_NAME_LAST, saver.FILE_EXTENSION = "last", ""  # as the recipes configure it
        callbacks.append(saver)
    return L.Trainer(
        accelerator="cpu", devices=world,
        strategy=TensorParallelStrategy(data_parallel_size=run["dp"], tensor_parallel_size=run["tp"]),
        max_steps=run["max_steps"], num_sanity_val_steps=0, limit_val_batches=0, logger=False,
        enable_checkpointing=bool(run.get("save_dir")), enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )


def fit(run: dict[str, Any], spec: dict[str, Any], world: int) -> tuple[L.Trainer, CausalLMModule, dict]:
    root = Path(spec["root"])
    module = CausalLMModule(run.get("model", "debug"), init_seed=7, lr=1e-3, warmup_steps=2, max_steps=TOTAL_STEPS)
    data = PretrainDataModule(spec["corpus"], seq_len=SEQ_LEN, batch_size=GLOBAL_BATCH // run["dp"],
                              val_fraction=0.05, cache_dir=str(root / "cache"))
    recorder = LossRecorder()
    trainer = make_trainer(run, world, root, recorder)
    result: dict[str, Any] = {"error": None}
    start = time.perf_counter()
    ckpt = str(root / run["ckpt"]) if run.get("ckpt") else None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    except Exception as e:  # noqa: BLE001 - recorded, checked by the test
        if not run.get("expect_error"):
            raise
        result["error"] = f"{type(e).__name__}: {e}"
    mesh = trainer.strategy.device_mesh
    mine = {"dp_rank": mesh["data_parallel"].get_local_rank(), "losses": recorder.losses,
            "global_step": trainer.global_step, "error": result["error"]}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    # The global loss of a step: mean over the data-parallel replicas (equal token counts, no masked labels).
    by_step: dict[int, dict[int, float]] = {}
    for rank in everyone:
        for step, loss in rank["losses"].items():
            by_step.setdefault(step, {})[rank["dp_rank"]] = loss
    result.update(seconds=round(time.perf_counter() - start, 2), ranks=everyone,
                  global_losses={s: sum(v.values()) / len(v) for s, v in sorted(by_step.items())})
    return trainer, module, result


def save_weights(module: CausalLMModule, file: str) -> None:
    from torch.distributed.tensor import DTensor

    full = {n.removeprefix("model."): (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in module.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(full, file)


def inject(fault: dict[str, Any]) -> Any:
    """Patch the save path to raise on this rank; returns an undo function."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    if dist.get_rank() not in fault["ranks"]:
        return lambda: None
    if fault["where"] == "meta":  # after the shards are written, before the new directory is swapped in
        original_save = torch.save

        def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if "meta.pt" in str(f):
                raise OSError("injected: disk full while writing meta.pt")
            return original_save(obj, f, *args, **kwargs)

        torch.save = failing_save
        return lambda: setattr(torch, "save", original_save)
    original_write = dcp_fs.FileSystemWriter.write_data

    def failing_write(self: Any, plan: Any, planner: Any) -> Any:
        raise OSError("injected: I/O error while writing a shard")

    dcp_fs.FileSystemWriter.write_data = failing_write
    return lambda: setattr(dcp_fs.FileSystemWriter, "write_data", original_write)


def listing(path: Path) -> dict[str, Any]:
    """What a reader would see in ``path``'s folder after a failed save."""
    meta = path / "meta.pt"
    return {
        "siblings": sorted(p.name for p in path.parent.iterdir()),
        "files": sorted(p.name for p in path.iterdir()) if path.is_dir() else None,
        "global_step": int(torch.load(meta, weights_only=True)["global_step"]) if meta.is_file() else None,
    }


def main() -> None:
    out_path, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    world = spec["devices"]
    results: dict[str, Any] = {"runs": {}, "faults": {}}
    trainer = None
    for run in spec["runs"]:
        trainer, module, results["runs"][run["name"]] = fit(run, spec, world)
        weights, full_file = spec.get("weights", []), spec.get("full_file")
        for w in weights if isinstance(weights, list) else [weights]:
            if w["run"] == run["name"]:
                save_weights(module, str(Path(spec["root"]) / w["file"]))
        if full_file and full_file["run"] == run["name"]:
            trainer.strategy._save_distributed_checkpoint = False
            trainer.save_checkpoint(Path(spec["root"]) / full_file["file"])
            trainer.strategy._save_distributed_checkpoint = True
    for fault in spec.get("faults", []):
        assert trainer is not None
        path = Path(spec["root"]) / fault["path"]
        undo = inject(fault)
        try:
            trainer.save_checkpoint(path)
            error = None
        except BaseException as e:  # noqa: BLE001 - recorded, checked by the test
            error = f"{type(e).__name__}: {e}"
        finally:
            undo()
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        results["faults"][fault["name"]] = {"errors": errors, **(listing(path) if dist.get_rank() == 0 else {})}
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
