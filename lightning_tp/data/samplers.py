"""Data-parallel sampling: the resumable training sampler, its DataLoader, and the trainer's replica
layout.

:class:`ResumableDistributedSampler` deals a seeded per-epoch permutation out round-robin over the
data-parallel ranks and can continue mid-epoch from a saved position; :class:`ResumableDataLoader`
exposes its owner's ``state_dict`` so that Lightning treats the loader as resumable;
:func:`data_parallel_replicas` reads ``(num_replicas, rank)`` of the data-parallel dimension from a
trainer (tensor-parallel ranks of one data-parallel group share a rank here, so they read the same
samples).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Protocol

from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableDistributedSampler", "data_parallel_replicas"]


def data_parallel_replicas(trainer: Any) -> tuple[int, int]:
    """``(num_replicas, rank)`` of the data-parallel dimension, from
    ``trainer.distributed_sampler_kwargs``; ``(1, 0)`` without a trainer or without distributed
    sampling."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 1, 0
    return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))


class ResumableDistributedSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` that can resume mid-epoch.

    Being a ``DistributedSampler``, Lightning keeps it instead of injecting its own. The order of
    epoch ``e`` is a permutation seeded with ``seed + e`` (identical on every rank), cut to a
    multiple of ``num_replicas`` (``drop_last=True``: every replica gets the same number of samples)
    and dealt out round-robin: replica ``r`` gets positions ``r, r + num_replicas, ...``.

    :meth:`state_dict` returns ``{"epoch", "consumed", "num_replicas"}``, ``consumed`` being the
    samples this replica has yielded in ``epoch``; after :meth:`load_state_dict`, the next iteration
    of that epoch skips them. ``len()`` stays the full epoch length (what Lightning expects of a
    resumed loader). The counter is exact when the sampler is read by a ``num_workers=0``
    DataLoader; worker processes prefetch ahead of training, so with workers take the position from
    the training loop's progress instead (:class:`~lightning_tp.data.pretrain.PretrainDataModule`
    does). Resuming with another ``num_replicas`` maps the position through the global sample count
    (rounded down).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.consumed = 0
        self._resume = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields; a different epoch starts at its
        beginning."""
        if epoch != self.epoch:
            self.consumed = 0
            self._resume = False
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # A generator: nothing is computed until the first index is requested, i.e. after
        # Lightning's set_epoch.
        indices = list(super().__iter__())
        start = min(self.consumed, len(indices)) if self._resume else 0
        self._resume = False
        self.consumed = start
        for index in indices[start:]:
            self.consumed += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "consumed", "num_replicas"}``: where this replica stands."""
        return {"epoch": int(self.epoch), "consumed": int(self.consumed),
                "num_replicas": int(self.num_replicas)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``: the next iteration of ``state["epoch"]`` skips the consumed
        samples. A state at the end of its epoch moves on to the start of the next epoch."""
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        saved_replicas = int(state.get("num_replicas", self.num_replicas))
        if saved_replicas != self.num_replicas:
            # Round-robin dealing: c samples on each of R replicas are the first c * R of the
            # epoch's order.
            consumed = consumed * saved_replicas // self.num_replicas
            warnings.warn(
                f"Resuming the data order with num_replicas={self.num_replicas} from a state saved"
                f" with {saved_replicas}; the position is rounded down to {consumed} samples per"
                " replica.",
                stacklevel=2,
            )
        if consumed >= self.num_samples:
            epoch, consumed = epoch + 1, 0
        self.epoch = epoch
        self.consumed = consumed
        self._resume = True


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ResumableDataLoader(DataLoader):
    """A DataLoader whose ``state_dict`` is the data module's train position, so Lightning treats it
    as resumable (and restores it with the fit loop, in addition to the data module's own checkpoint
    entry)."""

    def __init__(self, *args: Any, datamodule: _Stateful, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        return self._datamodule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._datamodule.load_state_dict(state)
