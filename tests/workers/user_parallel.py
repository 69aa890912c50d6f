"""Multi-process worker: models the user parallelizes in ``configure_model`` (Lightning's tensor-parallel guide),
trained with the same code under ``ModelParallelStrategy``, ``TensorParallelStrategy()`` and
``TensorParallelStrategy(plan=None)``. ``python tests/workers/user_parallel.py OUT.json`` on 4 CPU ranks
(dp=2 × tp=2); Lightning re-runs this file for ranks 1-3.

Two models: Lightning's feed-forward example (not a Llama: ``plan="auto"`` used to refuse it before spawn) and the
native Llama (``plan="auto"`` used to shard it a second time). Each rank writes its losses per run; the launching
process also records its ``os.environ`` around every Trainer call of the subclass.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_tp import Llama, TensorParallelStrategy, get_config

STEPS, BATCH, SEQ = 4, 2, 16
CONFIG = get_config("debug")


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.dtensor_params = 0

    def on_train_start(self) -> None:
        self.dtensor_params = sum(isinstance(p, DTensor) for p in self.parameters())

    def record(self, loss: torch.Tensor) -> torch.Tensor:
        self.losses.append(loss.detach().item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class FeedForwardModule(Recorder):
    """Built in ``__init__``, parallelized in ``configure_model``: TP on the TP mesh, FSDP2 on the dp mesh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = FeedForward()

    def configure_model(self) -> None:
        mesh = self.device_mesh
        parallelize_module(self.model, mesh["tensor_parallel"],
                           {"w1": ColwiseParallel(), "w2": ColwiseParallel(), "w3": RowwiseParallel()})
        for layer in (self.model.w1, self.model.w2, self.model.w3):
            fully_shard(layer, mesh=mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.record(self.model(batch[0]).pow(2).mean())


class LlamaModule(Recorder):
    """The native Llama built and parallelized in ``configure_model``, the per-projection way Lightning's guide
    writes it, with FSDP2 per block and on the model root."""

    def __init__(self) -> None:
        super().__init__()
        self.model: Llama | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(0)
        model = Llama(CONFIG)
        model.init_weights(seed=0)
        mesh = self.device_mesh
        for block in model.model.layers:
            parallelize_module(block, mesh["tensor_parallel"], {
                "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel()})
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(model, mesh=mesh["data_parallel"])
        self.model = model

    def loss(self, batch: Any) -> torch.Tensor:
        tokens = batch[0]
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.record(self.loss(batch))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(batch[0][:, :-1]).argmax(-1)


def data(kind: str) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    n = STEPS * BATCH * 2  # two data-parallel replicas
    x = torch.randn(n, 32, generator=g) if kind == "ffn" else torch.randint(0, CONFIG.vocab_size, (n, SEQ + 1),
                                                                            generator=g)
    return DataLoader(TensorDataset(x), batch_size=BATCH)


def trainer(strategy: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=STEPS, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=1, limit_test_batches=1, limit_predict_batches=1, num_sanity_val_steps=0)


def main(out: Path) -> None:
    strategies = {  # the subclass first: its launcher starts the ranks
        "auto": lambda: TensorParallelStrategy(data_parallel_size=2, tensor_parallel_size=2),
        "none": lambda: TensorParallelStrategy(data_parallel_size=2, tensor_parallel_size=2, plan=None),
        "parent": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2),
    }
    runs: dict[str, Any] = {}
    environ: dict[str, Any] = {}
    for model_name, make in (("ffn", FeedForwardModule), ("llama", LlamaModule)):
        for strategy_name, strategy in strategies.items():
            module = make()
            t = trainer(strategy())
            before = dict(os.environ)
            t.fit(module, data(model_name))
            if model_name == "llama" and strategy_name == "auto":  # every Trainer entry point of the subclass
                environ["fit"] = before
                for call in ("validate", "test", "predict"):
                    environ[f"before {call}"] = dict(os.environ)
                    getattr(t, call)(module, data(model_name))
                    environ[f"after {call}"] = dict(os.environ)
            runs[f"{model_name}/{strategy_name}"] = {"losses": module.losses, "dtensor_params": module.dtensor_params}
            if not environ.get("launch"):  # the fit that started the ranks
                environ["launch"] = {"before": before, "after": dict(os.environ)}
            if model_name == "llama" and strategy_name == "auto":
                environ["after fit"] = dict(os.environ)
    rank = dist.get_rank()
    record = {"rank": rank, "runs": runs}
    if rank == 0:
        record["environ"] = environ
    Path(f"{out}.rank{rank}").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
