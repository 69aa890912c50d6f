"""What the preflight tests fit: a LightningModule around a model of the test's choosing, and the ``debug`` Llama on
the meta device (shapes only: preflight never needs weights). Shared by ``tests/unit/strategy/``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_tp.models import Llama, get_config


class ModelModule(L.LightningModule):
    """``self.model = model``, trained on the mean of ``model(batch)`` with SGD."""

    def __init__(self, model: nn.Module | None) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(batch).float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def meta_llama(**overrides: Any) -> Llama:
    """The ``debug`` Llama (8 heads, 4 KV heads, h 64, MLP 192, vocab 512) with ``overrides``, on the meta device."""
    with torch.device("meta"):
        return Llama(get_config("debug", **overrides))
