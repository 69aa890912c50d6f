"""What the recipes do with a composed config: instantiate the pieces, fit, sample, summarise.

Kept out of the ``@hydra.main`` scripts so the same path runs from a notebook (``compose`` +
:func:`run`).
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
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from lightning_tp.checkpoint.hf import config_from_hf
from lightning_tp.checkpoint.safe_reading import read_checkpoint_metadata
from lightning_tp.checkpoint.weights import LoadWeights, check_weights_fit, is_hf_checkpoint
from lightning_tp.data.tokenizers import check_tokenizer
from lightning_tp.errors import CheckpointError, SequenceLengthError
from lightning_tp.launch.preflight import check_devices
from lightning_tp.models import LlamaConfig, get_config
from lightning_tp.recipes import lora as lora_checks
from lightning_tp.recipes import report
from lightning_tp.training.callbacks import ThroughputMonitor
from lightning_tp.training.generate import check_sampling, generate
from lightning_tp.training.module import CausalLMModule, parameter_counts

__all__ = ["model_config", "run"]

CPU_DEVICES = 4
"""Processes a recipe starts on a machine without GPUs when ``trainer.devices`` is ``auto``."""

_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
"""What a launch sets in the environment; :func:`run` restores it after a ``--multirun`` job."""


def model_config(cfg: DictConfig) -> LlamaConfig:
    """The preset ``cfg.name`` with every non-null field of ``cfg`` overriding it."""
    overrides = {k: v for k, v in OmegaConf.to_container(cfg).items()
                 if k != "name" and v is not None}
    return get_config(cfg.name, **overrides)


class ValidationHistory(L.Callback):
    """Remembers ``val/loss`` after every validation run, the sanity check (step 0) included."""

    KEY = "val/loss_history"

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.history.append((trainer.global_step, float(value)))
            # Also as a metric tensor: callback metrics are what a fork launcher sends back to a
            # notebook.
            trainer.callback_metrics[self.KEY] = torch.tensor(self.history)

    def result(self, trainer: L.Trainer) -> list[tuple[int, float]]:
        if self.history:
            return self.history
        sent = trainer.callback_metrics.get(self.KEY)
        return [] if sent is None else [(int(s), float(v)) for s, v in sent.tolist()]


def _instantiate(config: Any, **kwargs: Any) -> Any:
    """Hydra's ``instantiate``, but a target's own error (typed, naming the input and the fix) is
    raised as it is, not inside Hydra's ``InstantiationException``, so callers and users see e.g. a
    ``DataError``."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if not isinstance(cause, Exception):
            raise
        cause.__suppress_context__ = True  # the wrapper only repeats the message
        raise cause  # noqa: B904 - the target's own error, with its own cause chain


def _devices_and_strategy(cfg: DictConfig) -> tuple[dict[str, Any], Any]:
    """Trainer accelerator/devices and the strategy. Lightning's ``devices="auto"`` on a machine
    without GPUs means one process; the recipes run :data:`CPU_DEVICES` processes there instead, as
    dp=2 × tp=2 unless the strategy sizes are given."""
    accelerator, devices = cfg.trainer.accelerator, cfg.trainer.devices
    sizes: dict[str, Any] = {}
    if devices == "auto" and accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        accelerator, devices = "cpu", CPU_DEVICES
        strategy = cfg.strategy
        if strategy.tensor_parallel_size == "auto" and strategy.data_parallel_size == "auto":
            sizes["tensor_parallel_size"] = 2
    check_devices(accelerator, devices, cfg.trainer.num_nodes, name="trainer.devices")
    return {"accelerator": accelerator, "devices": devices}, _instantiate(cfg.strategy, **sizes)


def _check_sequence_length(strategy: Any, seq_len: int) -> None:
    """Under sequence parallelism every batch's length must split over the TP ranks; the recipes'
    batches are ``data.seq_len`` long, so check that here instead of at the first forward of every
    rank."""
    if not getattr(strategy, "sequence_parallel", False):
        return
    tp = strategy.sequence_shards  # the TP size, or a 2D grid's rows
    what = (f"tensor_parallel_size={tp}" if strategy.grid is None
            else f"the rows of tensor_parallel_size={list(strategy.grid)}")
    if seq_len % tp:
        raise SequenceLengthError(
            f"data.seq_len={seq_len} is not divisible by {what}, which sequence"
            f" parallelism needs. Fix: set data.seq_len to a multiple of {tp} (e.g."
            f" data.seq_len={max(tp, seq_len - seq_len % tp)}), or use strategy=tp (no sequence"
            " parallelism)."
        )


def _loggers(cfg: DictConfig, out_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = []
    if cfg.csv:
        loggers.append(CSVLogger(save_dir=str(out_dir), name="logs"))
    tb = str(cfg.tensorboard).lower()
    if tb not in ("auto", "true", "false"):
        raise ValueError(f"logger.tensorboard={cfg.tensorboard!r} must be 'auto', 'true' or"
                         " 'false'.")
    if tb == "true" or (tb == "auto" and _has_tensorboard()):
        loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard"))
    return loggers


def _metrics_csv(trainer: L.Trainer) -> Path | None:
    """The CSV logger's ``metrics.csv`` (it may not exist yet), or None without a CSV logger."""
    from lightning.pytorch.loggers import CSVLogger

    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    return None if csv is None else Path(csv.log_dir) / "metrics.csv"


def _sample_settings(cfg: DictConfig) -> dict[str, Any]:
    """``generate``'s sampling arguments from the ``sample_*`` keys, checked (a bad value fails
    before fit)."""
    temperature, top_k = float(cfg.get("sample_temperature", 0.0)), cfg.get("sample_top_k")
    try:
        check_sampling(temperature, top_k)
    except ValueError as e:
        raise ValueError(f"sample_temperature / sample_top_k: {e}. Fix: e.g. sample_temperature=0.8"
                         " sample_top_k=40, or sample_temperature=0 for greedy.") from None
    seed = cfg.seed if cfg.get("sample_seed") is None else cfg.sample_seed
    return {"temperature": temperature, "top_k": top_k, "seed": int(seed)}


def _has_tensorboard() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def _resume_path(resume: str | None, out_dir: Path) -> str | None:
    if resume is None:
        return None
    path = out_dir / "last" if resume == "last" else Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume={resume!r}: no checkpoint at {str(path)!r}. Train first, or"
                              " set resume=null.")
    if path.is_dir():  # complete, its shard files all there: checked here, not inside every rank
        read_checkpoint_metadata(path)
    return str(path)


def _sweep_job() -> Any:
    """Hydra's config of the current job when it is part of a ``--multirun`` sweep, else
    ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get()
    return None


def _children_run_this_job_only() -> None:
    """Under ``--multirun``, make the ranks Lightning launches run this one job, not the whole
    sweep.

    Lightning re-runs ``sys.argv`` for the other ranks with ``hydra.run.dir`` set to the run
    directory; for a sweep job that must be the job's own overrides and output directory.
    """
    from omegaconf import read_write

    hydra_cfg = _sweep_job()
    if hydra_cfg is None:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def _job_out_dir(cfg: DictConfig) -> Path:
    """``cfg.out_dir``, or under ``--multirun`` the job's own directory
    (``out_dir/multirun/<time>/<job>``)."""
    hydra_cfg = _sweep_job()
    return Path(cfg.out_dir if hydra_cfg is None else hydra_cfg.runtime.output_dir)


def _end_sweep_job(launched: dict[str, str | None]) -> None:
    """After a ``--multirun`` job, close its process group and forget its launch environment, so
    the next job of the sweep spawns fresh ranks on a fresh port instead of waiting for the
    finished ones."""
    if _sweep_job() is None:
        return
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in launched.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _sizes(strategy: Any) -> tuple[int, int | str] | None:
    """``(dp, tp)`` as printed; a 2D grid's tp as ``"r×c"``."""
    grid = getattr(strategy, "grid", None)
    try:
        if grid:
            return int(strategy.data_parallel_size), f"{grid[0]}×{grid[1]}"
        return int(strategy.data_parallel_size), int(strategy.tensor_parallel_size)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None


def _write_loss_curve(out_dir: Path, metrics_csv: Path | None, summary: dict[str, Any],
                      sizes: tuple[int, int] | None) -> str | None:
    """``out_dir/loss_curve.png`` from the CSV log's train loss and the validation history; its
    path, or None (and one printed line saying why) when it cannot be drawn."""
    if not report.has_matplotlib():
        print("[lightning-tp] loss curve skipped: matplotlib is not installed (pip install"
              " matplotlib)")
        return None
    title = f"{summary['steps']} steps" + (f", dp={sizes[0]} x tp={sizes[1]}" if sizes else "")
    path = report.write_loss_curve(out_dir / "loss_curve.png",
                                   report.read_train_losses(metrics_csv),
                                   summary["val_loss_history"], title=title)
    return None if path is None else str(path)


def _size(path: Path) -> int | None:
    """Bytes of the files under ``path`` (a checkpoint directory or file); None if absent."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(cfg: DictConfig, checkpoint: str | None = None) -> dict[str, Any]:
    """Fit a :class:`CausalLMModule` as ``cfg`` says; returns (and on rank 0 writes) a summary.

    Everything that can be checked in the launching process is checked before ``fit`` spawns ranks:
    config values, the tokenizer against the model's vocabulary, the mesh, the plan, the checkpoint
    path.
    """
    start = time.perf_counter()
    launched = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    _children_run_this_job_only()
    out_dir = _job_out_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    sampling = _sample_settings(cfg)
    llama = model_config(cfg.model)
    data_overrides: dict[str, Any] = {}
    if checkpoint is not None and is_hf_checkpoint(checkpoint):
        # A Hugging Face directory brings its own architecture and, with
        # data.tokenizer=checkpoint, its tokenizer.
        llama = config_from_hf(json.loads((Path(checkpoint) / "config.json").read_text()))
        if cfg.data.tokenizer == "checkpoint":
            data_overrides["tokenizer"] = str(checkpoint)
    elif cfg.data.tokenizer == "checkpoint":
        raise CheckpointError(f"data.tokenizer=checkpoint needs checkpoint= to be a Hugging Face"
                              f" model directory with tokenizer files (checkpoint={checkpoint!r})."
                              " Fix: set checkpoint=DIR of such a directory, or"
                              " data.tokenizer=byte or the path of a tokenizer.json.")
    # peft=lora (finetune only): settings and targets against the model, and what resume= holds
    lora = lora_checks.lora_settings(cfg.peft, checkpoint) if "peft" in cfg else None
    if lora is not None:
        lora_checks.check_lora_targets(llama, lora)
    resume = _resume_path(cfg.resume, out_dir)
    lora_checks.check_resume(resume, lora)
    # plain lists/dicts, not OmegaConf containers: checkpoints store the data module's arguments
    datamodule = _instantiate(cfg.data, _convert_="all", **data_overrides)
    check_tokenizer(datamodule.tokenizer, llama.vocab_size)
    # Read and tokenise the data here, in the launching process, so that a missing file or a
    # malformed record fails before any rank starts; the ranks then reuse the cache.
    datamodule.prepare_data()
    datamodule.setup("fit")
    if checkpoint is not None and not is_hf_checkpoint(checkpoint):
        if not Path(checkpoint).is_dir():
            raise CheckpointError(f"checkpoint={checkpoint!r} is not a sharded checkpoint"
                                  " directory. Use the out_dir/last of a pretraining run (e.g."
                                  " checkpoint=out/pretrain/last) or a Hugging Face model"
                                  " directory.")
    module = CausalLMModule(
        model=llama, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
        betas=tuple(cfg.optimizer.betas), warmup_steps=cfg.scheduler.warmup_steps,
        min_lr_ratio=cfg.scheduler.min_lr_ratio, init_seed=cfg.seed, lora=lora,
    )
    counts = parameter_counts(module)
    if lora is not None:
        rank_zero_info(lora_checks.describe(lora, counts))
    if checkpoint is not None:
        # Names, shapes and shard files against the meta-device model: another model's, another
        # shape's or a truncated checkpoint fails here, not in every rank after the launch.
        check_weights_fit(module, checkpoint)
    history = ValidationHistory()
    saver = ModelCheckpoint(
        dirpath=str(out_dir), filename="step-{step}", save_top_k=0, save_last=True,
        every_n_train_steps=cfg.checkpoint_every_n_steps or cfg.trainer.max_steps)
    saver.CHECKPOINT_NAME_LAST, saver.FILE_EXTENSION = "last", ""
    callbacks: list[Any] = [ThroughputMonitor(), saver, history]
    if checkpoint is not None:
        callbacks.append(LoadWeights(checkpoint))
    trainer_cfg = {k: v for k, v in OmegaConf.to_container(cfg.trainer).items()
                   if k not in ("accelerator", "devices")}
    # the step-0 validation is the baseline
    trainer_cfg["num_sanity_val_steps"] = trainer_cfg.get("limit_val_batches", 2)
    devices, strategy = _devices_and_strategy(cfg)
    trainer: L.Trainer = _instantiate(
        trainer_cfg, **devices, strategy=strategy, callbacks=callbacks,
        logger=_loggers(cfg.logger, out_dir) or False, default_root_dir=str(out_dir),
    )
    _check_sequence_length(trainer.strategy, cfg.data.seq_len)
    if lora is not None:
        lora_checks.check_lora_plan(module, trainer.strategy, lora)
    # Resolved here, before any rank starts, so that every process (forked ones too) names the
    # same version.
    metrics_csv = _metrics_csv(trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)

    sample = None
    if cfg.sample_prompt:
        strategy = trainer.strategy
        multiple = getattr(strategy, "sequence_shards", 1)
        sample = generate(module.model, datamodule.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                          pad_to_multiple_of=multiple, max_context=cfg.data.seq_len, **sampling)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {
        "wall_time_s": time.perf_counter() - start,
        "steps": trainer.global_step,
        "val_loss_history": history.result(trainer),
        "tokens_per_sec": metrics.get("perf/tokens_per_sec"),
        "metrics": metrics,
        "checkpoint": str(out_dir / "last"),
        "sample_prompt": cfg.sample_prompt,
        "sample": sample,
        **{f"sample_{k}": v for k, v in sampling.items()},
        "world_size": trainer.world_size,
        "loss_curve": None,
        "parameters": counts,
        "lora": lora,
    }
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary["checkpoint_bytes"] = _size(out_dir / "last")
        sizes = _sizes(trainer.strategy)
        summary["loss_curve"] = _write_loss_curve(out_dir, metrics_csv, summary, sizes)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print()
        for line in report.summary_lines(summary, sizes=sizes, loss_curve=summary["loss_curve"],
                                         out_dir=str(out_dir)):
            print(line)
    _end_sweep_job(launched)
    return summary
