"""Multi-process worker for head layouts the default plan used to refuse: ``python tests/workers/head_layouts.py
OUT.json SPEC.json``.

Each case is a tiny native Llama keeping a real model's query:KV head ratio (e.g. TinyLlama's 32:4 as 8:1), trained
with ``TensorParallelStrategy`` at the case's (dp, tp) for three SGD steps. Rank 0 writes the losses and the
first step's gradients (full tensors) next to an independent single-process reference: a plain ``Llama`` on
the same data split, the same SGD. One launch runs every case of a world size, so Lightning is imported once.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tp import Llama, LlamaConfig, TensorParallelStrategy

SEQ, MICRO_BATCH, STEPS, LR = 8, 2, 3, 0.5


def config(case: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(vocab_size=case.get("vocab", 64), hidden_size=case["heads"] * 4, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=case["heads"],
                       num_key_value_heads=case["kv_heads"], head_dim=4, max_position_embeddings=SEQ,
                       tie_word_embeddings=case.get("tied", False))


def dataset(cfg: LlamaConfig, dp: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, cfg.vocab_size, (STEPS * MICRO_BATCH * dp, SEQ + 1), generator=g)


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


class Lit(L.LightningModule):
    def __init__(self, cfg: LlamaConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = Llama(cfg)
        self.model.load_state_dict(weights)
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = loss_of(self.model, batch[0])
        self.losses.append(loss.detach().item())
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if not self.grads:
            self.grads = {n.removeprefix("model."): full(p.grad) for n, p in self.named_parameters()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def reference(cfg: LlamaConfig, weights: dict[str, torch.Tensor], dp: int) -> dict[str, Any]:
    model = Llama(cfg)
    model.load_state_dict(weights)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = dataset(cfg, dp)
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
    return {"losses": losses, "grads": grads}


def run_case(case: dict[str, Any], devices: int) -> dict[str, Any] | None:
    cfg = config(case)
    torch.manual_seed(0)
    init = Llama(cfg)
    init.init_weights(seed=0)
    weights = {k: v.clone() for k, v in init.state_dict().items()}
    module = Lit(cfg, weights)
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=TensorParallelStrategy(data_parallel_size=case["dp"], tensor_parallel_size=case["tp"],
                                                        sequence_parallel=case.get("sp", True)))
    trainer.fit(module, DataLoader(TensorDataset(dataset(cfg, case["dp"])), batch_size=MICRO_BATCH))
    mine = {"rank": trainer.global_rank, "losses": module.losses,
            "dp_rank": trainer.strategy.device_mesh["data_parallel"].get_local_rank(),
            "q_proj": type(module.model.model.layers[0].self_attn.q_proj).__name__,
            "k_proj": type(module.model.model.layers[0].self_attn.k_proj).__name__,
            # the rows of lm_head this rank holds (TP only: under FSDP2 the local tensor is a dp shard of them)
            "vocab_rows": module.model.lm_head.weight.to_local().shape[0] if case["dp"] == 1 else None}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if trainer.global_rank != 0:
        return None
    ref = reference(cfg, weights, case["dp"])
    grad_abs = {n: float((module.grads[n] - g).abs().max()) for n, g in ref["grads"].items()}
    return {**case, "ranks": everyone, "ref_losses": ref["losses"], "grad_abs_err": grad_abs,
            "grad_absmax": max(float(g.abs().max()) for g in ref["grads"].values())}


def comm_counts(layouts: list[list[int]]) -> dict[str, Any]:
    """Collectives of one forward and one backward at tp = world size (SP and loss parallel on), for 1 and 2
    layers of each (query heads, KV heads[, vocabulary]) layout, so that their difference is what one layer
    costs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for heads, kv_heads, *vocab in layouts:
        for layers in (1, 2):
            cfg = config({"heads": heads, "kv_heads": kv_heads, "vocab": vocab[0] if vocab else 64}
                         ).replace(num_hidden_layers=layers)
            model = Llama(cfg)
            model.init_weights(seed=0)
            apply_tensor_parallel(model, resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True),
                                  mesh)
            tokens = dataset(cfg, 1)[:MICRO_BATCH]
            counts = {}
            for phase in ("forward", "backward"):
                mode = CommDebugMode()
                with mode, loss_parallel():
                    if phase == "forward":
                        loss = loss_of(model, tokens)
                    else:
                        loss.backward()
                counts[phase] = {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}
            results[f"{heads}:{kv_heads}{f'/V={vocab[0]}' if vocab else ''}/L={layers}"] = counts
    return results


def main() -> None:
    out_path, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    results = [run_case(case, spec["devices"]) for case in spec["cases"]]
    counts = comm_counts(spec["comm_counts"]) if spec.get("comm_counts") else None
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"cases": results, "comm_counts": counts}, f)


if __name__ == "__main__":
    main()
