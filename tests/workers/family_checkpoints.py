"""Multi-process worker: checkpoints of transformers models of every family, trained by the Trainer with
``TensorParallelStrategy`` (issue 15): ``python tests/workers/family_checkpoints.py OUT.json SPEC.json``.

SPEC: ``{"root": dir, "devices": N, "cases": [case name, ...]}`` (names from ``tests/workers/family_cases``). For
each case, at tp = N, on one batch per epoch: an uninterrupted 4-step AdamW run; a 2-step run that saves
``ROOT/NAME/last``; a run resumed from it to step 4. Rank 0 records the losses, and the logits that the weights of
the saved step give in one process (``ROOT/NAME/logits.pt``), for the export test to compare with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from family_cases import BATCH, SEQ, VOCAB, all_cases  # noqa: E402

from lightning_tp import TensorParallelStrategy  # noqa: E402
from lightning_tp.checkpoint.hf_family import model_layout  # noqa: E402

STEPS, LR = 4, 1e-3


class LitHF(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.losses: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.losses[self.global_step + 1] = float(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


def data() -> DataLoader:
    """One batch per epoch, so a run resumed at a step boundary sees what the uninterrupted one saw (a plain
    DataLoader does not resume mid-epoch)."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    return DataLoader(TensorDataset(ids), batch_size=BATCH)


def fit(build: Any, devices: int, steps: int, save: Path | None = None, ckpt: Path | None = None) -> LitHF:
    module = LitHF(build(2))
    callbacks = []
    if save is not None:
        saver = ModelCheckpoint(dirpath=str(save), save_top_k=0, save_last=True, every_n_train_steps=steps)
        saver.CHECKPOINT_NAME_LAST, saver.FILE_EXTENSION = "last", ""
        callbacks.append(saver)
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_steps=steps, logger=False,
                        enable_checkpointing=save is not None, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, strategy=TensorParallelStrategy(tensor_parallel_size=devices))
    trainer.fit(module, data(), ckpt_path=str(ckpt) if ckpt else None)
    return module


def main() -> None:
    out_path, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    root, devices = Path(spec["root"]), spec["devices"]
    cases = {c.name: c for c in all_cases()}
    results = {}
    for name in spec["cases"]:
        build = cases[name].build
        full = fit(build, devices, STEPS)
        stopped = fit(build, devices, 2, save=root / name)
        weights = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                   for k, v in stopped.model.state_dict().items()}
        resumed = fit(build, devices, STEPS, ckpt=root / name / "last")
        if dist.get_rank() == 0:
            plain = build(2)
            plain.load_state_dict(model_layout(plain, weights))  # Phi-3's fused rows, the experts' shape
            x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(9))
            with torch.no_grad():
                torch.save({"ids": x, "logits": plain(input_ids=x).logits}, root / name / "logits.pt")
        results[name] = {"full": full.losses, "stopped": stopped.losses, "resumed": resumed.losses}
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
