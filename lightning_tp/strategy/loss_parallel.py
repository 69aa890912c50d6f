"""Loss parallelism scoped to the cross entropy: ``F.cross_entropy`` on vocab-sharded DTensor
logits runs under torch's ``loss_parallel()``; every other op keeps DTensor's usual semantics.

How: a ``TorchFunctionMode`` entered for the duration of a step. While a mode is active, torch
hands it every call of a torch function (``F.cross_entropy`` included, and ``nn.CrossEntropyLoss``,
which calls it), on this thread only. The mode lets every call through unchanged except a cross
entropy whose input is a DTensor, which it runs under ``loss_parallel()`` and returns as a plain
tensor that Lightning can log and reduce. Nothing process-wide is replaced, so another thread (a
data-loader thread, a second trainer) never sees the change, and a user's
``from torch.nn.functional import cross_entropy`` is routed too.

Why not the whole step under ``loss_parallel()`` (torchtitan's choice): that context changes how
*every* DTensor ``log_softmax``/``nll_loss`` is computed and refuses inputs not sharded on the
class dimension, which would break user code that applies them to other DTensors in the step.
The cost of the mode is one Python call per torch function in the step (measured in the note of
issue 13); the backward of the loss runs under ``loss_parallel()`` in the strategy's ``backward``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.overrides import TorchFunctionMode

from lightning_tp.parallel.dtensor import full

__all__ = ["VocabParallelCrossEntropy"]


class VocabParallelCrossEntropy(TorchFunctionMode):
    """``with VocabParallelCrossEntropy(): ...`` routes ``F.cross_entropy`` on DTensor logits
    through ``loss_parallel()``; the loss comes back as a plain (replicated) tensor."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy and args and isinstance(args[0], DTensor):
            with loss_parallel():
                # a new tensor, not a view of the DTensor's: a caller may add to it in place
                # (transformers adds the MoE load-balancing loss with `+=`)
                return full(func(*args, **kwargs)).clone()
        return func(*args, **kwargs)
