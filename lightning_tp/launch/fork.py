"""The notebook launcher: fork the ranks from this (e.g. Jupyter) process, bring the trained weights
back.

Lightning's own model-parallel strategy refuses notebooks, and its fork launcher would pickle
DTensor shards back to the notebook: here every rank takes part in gathering the full weights, and
the notebook's module receives ordinary tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from typing_extensions import override

from lightning_tp._compat import MultiProcessingLauncher, WorkerOutput
from lightning_tp.launch.preflight import LaunchedStrategy
from lightning_tp.launch.script import preflight
from lightning_tp.parallel.ownership import has_parameters
from lightning_tp.parallel.parallelize import materialize

if TYPE_CHECKING:
    import lightning.pytorch as pl


__all__ = ["ForkLauncher", "receive_weights"]


class _DropSequentialAllGatherNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "sequential all_gather operations" not in record.getMessage()


@contextlib.contextmanager
def _quiet_sequential_all_gathers() -> Any:
    """Silence DTensor's note (a ``logging`` warning, once per rank) that gathering an FSDP + TP
    parameter, placed ``(_StridedShard(0), Shard(0))`` on the (dp, tp) mesh, takes two all-gathers
    that "may give inconsistent results between ranks due to different reduction orders".
    All-gathers only copy shards, they reduce nothing, so every rank gets the same bits; and the
    order (tp first, then dp) cannot be merged into one collective."""
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    note = _DropSequentialAllGatherNote()
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


class ForkLauncher(MultiProcessingLauncher):
    """Fork the ranks from the current (e.g. Jupyter) process; bring the trained weights back as
    full tensors.

    CUDA must not be initialised in the notebook before ``fit`` (Lightning's fork check says so
    clearly).
    """

    def __init__(self, strategy: LaunchedStrategy) -> None:
        super().__init__(strategy, start_method="fork")

    @override
    def launch(self, function: Any, *args: Any, trainer: Optional[pl.Trainer] = None,
               **kwargs: Any) -> Any:
        preflight(self._strategy, trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)

    @override
    def _collect_rank_zero_results(self, trainer: pl.Trainer,
                                   results: Any) -> Optional[WorkerOutput]:
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            # A collective: every rank contributes its shards, rank 0 receives whole CPU tensors.
            with _quiet_sequential_all_gathers():
                state = get_model_state_dict(trainer.lightning_module,
                                             options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
            if self._strategy.global_rank == 0:
                weights_path = os.path.join(tempfile.mkdtemp(), "weights.pt")
                torch.save(state, weights_path)
        if self._strategy.global_rank != 0:
            return None
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) if callback is not None else None
        return WorkerOutput(best_model_path=best, weights_path=weights_path,
                            trainer_state=trainer.state, trainer_results=results,
                            extra=self.get_extra_results(trainer))

    @override
    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        # Loop progress too, so that trainer.global_step and current_epoch read right in the
        # notebook.
        return {**super().get_extra_results(trainer), "fit_loop": trainer.fit_loop.state_dict()}

    @override
    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if "fit_loop" in extra:
            trainer.fit_loop.load_state_dict(extra["fit_loop"])

    @override
    def _recover_results_in_main_process(self, worker_output: WorkerOutput,
                                         trainer: pl.Trainer) -> None:
        if worker_output.weights_path is not None:
            state = torch.load(worker_output.weights_path, map_location="cpu", weights_only=True)
            os.remove(worker_output.weights_path)
            os.rmdir(os.path.dirname(worker_output.weights_path))
            receive_weights(self._strategy, trainer.lightning_module, state)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)


def receive_weights(strategy: LaunchedStrategy, module: nn.Module,
                    state: dict[str, Tensor]) -> None:
    """Put the full weights gathered from the ranks into the launching process's (unsharded)
    ``module``.

    A module built on the meta device gets storage and its buffers first (``init_weights``), then
    every parameter is overwritten with the trained values.
    """
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        if strategy.plan is not None and has_parameters(module):
            materialize(module, strategy.resolve(module), torch.device("cpu"),
                        getattr(module, "init_seed", None))
        else:  # the user's own parallelization: storage only, the trained values follow
            module.to_empty(device="cpu")
    missing, unexpected = module.load_state_dict(state, strict=False)
    lost = sorted({n for n, _ in module.named_parameters()} & set(missing))
    if lost or unexpected:
        raise RuntimeError("Trained weights do not fit the launching process's module: missing"
                           f" {lost}, unexpected {sorted(unexpected)}.")
