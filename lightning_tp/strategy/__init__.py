"""The Lightning strategy: mesh, setup order, steps (:mod:`.strategy`); loss-parallel scope
(:mod:`.loss_parallel`); mesh-aware gradient clipping (:mod:`.precision`); crash-safe sharded
checkpoints (:mod:`.checkpoint_io`)."""

from lightning_tp.strategy.strategy import TensorParallelStrategy

__all__ = ["TensorParallelStrategy"]
