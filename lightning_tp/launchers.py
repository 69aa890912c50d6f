"""How ``TensorParallelStrategy`` starts its ranks: a script re-run (the default) or fork (notebooks).

Both validate the plan and model shapes in the launching process first. The fork launcher exists because
Lightning's own model-parallel strategy refuses notebooks, and its fork launcher would pickle DTensor shards
back to the notebook: here every rank takes part in gathering the full weights, and the notebook's module
receives ordinary tensors.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_tp.strategy import TensorParallelStrategy

__all__ = ["ForkLauncher", "ScriptLauncher"]


def _preflight(strategy: TensorParallelStrategy, trainer: Optional[pl.Trainer]) -> None:
    from lightning_tp.preflight import check_launch

    check_launch(strategy)  # CPU process count, rendezvous port: before any rank exists to wait on them
    if trainer is not None and trainer.lightning_module is not None:
        strategy.preflight(trainer.lightning_module)


class ScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher (re-runs ``sys.argv`` for ranks 1..N-1), with the preflight checks first."""

    def __init__(self, strategy: TensorParallelStrategy, *args: Any) -> None:
        super().__init__(*args)
        self._strategy = strategy

    @override
    def launch(self, function: Any, *args: Any, trainer: Optional[pl.Trainer] = None, **kwargs: Any) -> Any:
        _preflight(self._strategy, trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)


class ForkLauncher(_MultiProcessingLauncher):
    """Fork the ranks from the current (e.g. Jupyter) process; bring the trained weights back as full tensors.

    CUDA must not be initialised in the notebook before ``fit`` (Lightning's fork check says so clearly).
    """

    def __init__(self, strategy: TensorParallelStrategy) -> None:
        super().__init__(strategy, start_method="fork")

    @override
    def launch(self, function: Any, *args: Any, trainer: Optional[pl.Trainer] = None, **kwargs: Any) -> Any:
        _preflight(self._strategy, trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)

    @override
    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> Optional[_WorkerOutput]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            # A collective: every rank contributes its shards, rank 0 receives whole CPU tensors.
            state = get_model_state_dict(trainer.lightning_module,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self._strategy.global_rank == 0:
                weights_path = os.path.join(tempfile.mkdtemp(), "weights.pt")
                torch.save(state, weights_path)
        if self._strategy.global_rank != 0:
            return None
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) if callback is not None else None
        return _WorkerOutput(best, weights_path, trainer.state, results, self.get_extra_results(trainer))

    @override
    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        # Loop progress too, so that trainer.global_step and current_epoch read right in the notebook.
        return {**super().get_extra_results(trainer), "fit_loop": trainer.fit_loop.state_dict()}

    @override
    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if "fit_loop" in extra:
            trainer.fit_loop.load_state_dict(extra["fit_loop"])

    @override
    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: pl.Trainer) -> None:
        if worker_output.weights_path is not None:
            state = torch.load(worker_output.weights_path, map_location="cpu", weights_only=True)
            os.remove(worker_output.weights_path)
            os.rmdir(os.path.dirname(worker_output.weights_path))
            self._strategy.receive_weights(trainer.lightning_module, state)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)
