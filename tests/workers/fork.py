"""The interactive (fork) launch path outside a notebook: ``python tests/workers/fork.py OUT.json``.

Trains the parity worker's plain LightningModule with ``launcher="fork"`` at dp=2 × tp=2, then checks, in the
launching process, that the module holds full plain tensors equal to an independent single-process run, that
``trainer.callback_metrics`` came back, and that a meta-built module is materialised before receiving weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from parity import CLIP, MICRO_BATCH, STEPS, LitLlama, dataset, initial_weights, reference  # noqa: E402

from lightning_tp import CausalLMModule, TensorParallelStrategy  # noqa: E402


def main() -> None:
    weights = initial_weights()
    module = LitLlama(weights)
    trainer = L.Trainer(accelerator="cpu", devices=4, max_steps=STEPS, gradient_clip_val=CLIP, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=TensorParallelStrategy(data_parallel_size=2, tensor_parallel_size=2, launcher="fork"))
    trainer.fit(module, DataLoader(TensorDataset(dataset(2, 1)), batch_size=MICRO_BATCH))
    from torch.distributed.tensor import DTensor

    params = dict(module.model.named_parameters())
    ref = reference(2, 1, weights)["params"]
    result = {
        "plain": all(not isinstance(p, DTensor) for p in params.values()),
        "param_err": max(float((params[k] - ref[k]).abs().max()) for k in ref),
        "n": len(ref),
        "callback_metrics": sorted(trainer.callback_metrics),
        "train_loss": float(trainer.callback_metrics["train_loss"]),
        "global_step": trainer.global_step,
    }
    # A module built on the meta device (as CausalLMModule is) comes back materialised and trained.
    meta_module = CausalLMModule("debug", init_seed=3, warmup_steps=1)
    assert all(p.is_meta for p in meta_module.parameters())
    data = {"input_ids": torch.randint(0, 512, (16, 16)), "labels": torch.randint(0, 512, (16, 16))}
    rows = [{k: v[i] for k, v in data.items()} for i in range(16)]
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        strategy=TensorParallelStrategy(tensor_parallel_size=2, launcher="fork"))
    trainer.fit(meta_module, DataLoader(rows, batch_size=4))
    from lightning_tp.data.tokenizers import ByteTokenizer
    from lightning_tp.training.generate import generate

    result["meta_materialised"] = not any(p.is_meta for p in meta_module.parameters())
    result["inv_freq_finite"] = bool(torch.isfinite(meta_module.model.model.inv_freq).all())
    result["sample"] = generate(meta_module.model, ByteTokenizer(), "hi", max_new_tokens=4)
    Path(sys.argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
