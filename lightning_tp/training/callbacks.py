"""Training callbacks: throughput and model-FLOPs utilisation (MFU) monitoring.

Under tensor parallelism every rank of a tensor-parallel group sees the *same* batch, so tokens are
counted once per data-parallel replica:
``tokens/step = tokens per micro-batch × micro-batches × data-parallel size``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_tp.hardware import PEAK_FLOPS, peak_flops_for

# PEAK_FLOPS and peak_flops_for live in lightning_tp.hardware; this module re-exports them.
__all__ = ["PEAK_FLOPS", "ThroughputMonitor", "data_parallel_size", "mfu", "peak_flops_for",
           "tokens_per_step"]


def tokens_per_step(tokens_per_micro_batch: int, num_micro_batches: int,
                    data_parallel_size: int) -> int:
    """Tokens consumed by one optimizer step over all data-parallel replicas.

    Tensor-parallel ranks share their replica's batch and must not be counted, so this is the
    per-replica micro-batch size times the accumulated micro-batches times the number of
    *data-parallel* replicas.
    """
    if (min(tokens_per_micro_batch, num_micro_batches, data_parallel_size) < 0
            or data_parallel_size == 0):
        raise ValueError("token counts must be non-negative and data_parallel_size positive")
    return tokens_per_micro_batch * num_micro_batches * data_parallel_size


def mfu(tokens_per_sec: float, flops_per_token: float, world_size: int,
        peak_flops_per_device: float) -> float:
    """Model-FLOPs utilisation: achieved model FLOP/s over the peak of all ``world_size``
    devices."""
    if world_size <= 0 or peak_flops_per_device <= 0:
        raise ValueError("world_size and peak_flops_per_device must be positive")
    return tokens_per_sec * flops_per_token / (world_size * peak_flops_per_device)


def data_parallel_size(trainer: Any) -> int:
    """Number of data-parallel replicas: the mesh's ``data_parallel`` dim if any, else
    ``trainer.world_size``."""
    try:
        mesh = getattr(trainer.strategy, "device_mesh", None)
    except RuntimeError:  # ModelParallelStrategy before its processes are set up
        mesh = None
    if mesh is not None and "data_parallel" in (getattr(mesh, "mesh_dim_names", None) or ()):
        return int(mesh["data_parallel"].size())
    return int(trainer.world_size)


def _input_ids(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch.get("input_ids")
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return None


class ThroughputMonitor(L.Callback):
    """Logs ``perf/tokens_per_sec``, ``perf/tokens_per_sec_per_device``, ``perf/step_time`` and
    ``perf/mfu``.

    The time of an optimizer step runs from ``on_train_batch_start`` of its first micro-batch to
    ``on_train_batch_end`` of the micro-batch after which ``trainer.global_step`` advanced (so
    gradient accumulation is one step). Tokens are ``input_ids.numel()`` of each micro-batch,
    summed, times the data-parallel size. Values are rank-local estimates, logged without a
    collective.

    Args:
        peak_flops_per_device: peak FLOP/s of one device for MFU; if ``None``, looked up in
            :data:`PEAK_FLOPS` by CUDA device name and trainer precision. No MFU is logged when no
            figure is known (e.g. CPU).
        flops_per_token: training FLOPs per token; if ``None``,
            ``pl_module.model.config.flops_per_token(seq_len)`` is used when available. An explicit
            value wins over the model's.
        warmup_steps: optimizer steps measured but not logged at the start (compilation, allocator
            warm-up).
    """

    def __init__(
        self,
        peak_flops_per_device: float | None = None,
        flops_per_token: float | None = None,
        warmup_steps: int = 2,
    ) -> None:
        super().__init__()
        self.peak_flops_per_device = peak_flops_per_device
        self.flops_per_token = flops_per_token
        self.warmup_steps = warmup_steps
        self._steps_seen = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self._t0: float | None = None
        self._step_at_start = 0
        self._window_tokens = 0
        self._window_micro_batches = 0
        self._seq_len = 0

    @staticmethod
    def _sync(trainer: Any) -> None:
        device = getattr(trainer.strategy, "root_device", None)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def _peak(self, trainer: Any) -> float | None:
        if self.peak_flops_per_device is not None:
            return self.peak_flops_per_device
        device = getattr(trainer.strategy, "root_device", None)
        if device is None or torch.device(device).type != "cuda":
            return None
        return peak_flops_for(torch.cuda.get_device_name(device),
                              str(getattr(trainer, "precision", "32-true")))

    def _flops_per_token(self, pl_module: Any, seq_len: int) -> float | None:
        if self.flops_per_token is not None:
            return self.flops_per_token
        config = getattr(getattr(pl_module, "model", None), "config", None)
        if config is not None and hasattr(config, "flops_per_token"):
            return float(config.flops_per_token(seq_len))
        return None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._steps_seen = 0
        self._reset_window()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if self._t0 is None:
            self._sync(trainer)
            self._t0 = perf_counter()
            self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # started mid-window (should not happen); measure from the next step on
        if self._t0 is None:
            return
        input_ids = _input_ids(batch)
        if input_ids is not None:
            self._window_tokens += input_ids.numel()
            self._seq_len = int(input_ids.shape[-1])
        self._window_micro_batches += 1
        if trainer.global_step == self._step_at_start:
            return  # still accumulating gradients
        self._sync(trainer)
        elapsed = perf_counter() - self._t0
        # The micro-batch tokens are already summed over the window (exact even for a ragged last
        # batch).
        tokens = tokens_per_step(self._window_tokens, 1, data_parallel_size(trainer))
        seq_len = self._seq_len
        self._reset_window()
        self._steps_seen += 1
        if self._steps_seen <= self.warmup_steps or elapsed <= 0 or tokens == 0:
            return
        world_size = max(1, int(trainer.world_size))
        tokens_per_sec = tokens / elapsed
        kwargs = {"on_step": True, "on_epoch": False, "batch_size": 1}
        pl_module.log("perf/step_time", elapsed, **kwargs)
        pl_module.log("perf/tokens_per_sec", tokens_per_sec, **kwargs)
        pl_module.log("perf/tokens_per_sec_per_device", tokens_per_sec / world_size, **kwargs)
        peak = self._peak(trainer)
        flops_per_token = self._flops_per_token(pl_module, seq_len)
        if peak is not None and flops_per_token is not None:
            pl_module.log("perf/mfu", mfu(tokens_per_sec, flops_per_token, world_size, peak),
                          **kwargs)
