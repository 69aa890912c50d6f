"""Multi-process worker for transformers models under tensor parallelism: ``python hf_parity.py OUT.json N``.

Launched with N CPU processes through Lightning's own launcher (a Trainer fit runs first and brings the
process group up). Rank 0 writes the results; every reference is a single-process transformers model.
1. A transformers ``LlamaForCausalLM`` trained by the Trainer at tp=N with its own ``labels=`` loss: loss at
   every step and first-step gradients against the same model trained in one process.
2. Our native Llama and transformers Llama/Mistral/Qwen2/Qwen3 parallelised with the same plan at tp=N:
   logits and gradients against the single-process transformers model.
3. Collectives per layer: transformers Llama vs our Llama under the same plan.
4. The 2D plan on 1 × 2 and 2 × 1 grids (N = 2) or a 2 × 2 grid (N = 4): logits and gradients of transformers
   Llama, Mistral, Qwen2 and our Llama against the single-process transformers model.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import transformers
from torch.utils.data import DataLoader, TensorDataset

from lightning_tp import Llama, TensorParallelStrategy
from lightning_tp.checkpoint.hf import config_from_hf

SEQ, BATCH, STEPS, LR = 16, 2, 4, 1e-3
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=64)
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8}


def hf_model(family: str, seed: int = 0, **extra: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    small = {**SMALL, **{k: extra.pop(k) for k in list(extra) if k in SMALL}}
    if family == "llama":
        config = transformers.LlamaConfig(**small, rope_scaling=SCALING, **extra)
        return transformers.LlamaForCausalLM(config).eval()
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**small, head_dim=8, **extra)).eval()
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small, **extra)).eval()
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small, head_dim=8, **extra)).eval()
    raise ValueError(family)


def tokens(seed: int, n: int = BATCH) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


class LitHF(L.LightningModule):
    """What a transformers user writes: the model computes its own loss from ``labels``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = batch[0]
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


class FirstGrads(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            self.grads = {n.removeprefix("model."): full(p.grad) for n, p in pl_module.named_parameters()}


def trainer_run(world: int) -> dict[str, Any]:
    data = torch.cat([tokens(100 + i)[:, :SEQ] for i in range(STEPS)])  # HF shifts labels itself
    model = hf_model("llama", tie_word_embeddings=False)
    reference = copy.deepcopy(model).train()
    module, grads = LitHF(model), FirstGrads()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=TensorParallelStrategy(tensor_parallel_size=world),
                        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[grads])
    # dp=1: the single data-parallel rank reads the whole data set, in the sampler's order (seed 0, epoch 0)
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=BATCH, shuffle=False))
    if trainer.global_rank != 0:
        return {}
    order = list(torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0))
    opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    ref_losses, ref_grads = [], {}
    for step in range(STEPS):
        batch = data[order[step * BATCH:(step + 1) * BATCH]]
        loss = reference(input_ids=batch, labels=batch).loss
        loss.backward()
        ref_losses.append(loss.item())
        if step == 0:
            ref_grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}
        opt.step()
        opt.zero_grad()
    return {"losses": module.losses, "ref_losses": ref_losses,
            "grad_err": {k: float((grads.grads[k] - ref_grads[k]).abs().max()) for k in ref_grads}}


def parallelize(model: torch.nn.Module, mesh: Any, sp: bool, lp: bool) -> torch.nn.Module:
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    apply_tensor_parallel(model, resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=lp), mesh)
    return model


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def parity(world: int) -> dict[str, Any]:
    """Logits and gradients of each family (and our native Llama) at tp=world vs one process."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    ids = tokens(7)
    cases = [("llama", {"tie_word_embeddings": True}), ("llama", {"tie_word_embeddings": False}),
             ("mistral", {}), ("qwen2", {}), ("qwen3", {}),
             # fewer KV heads than tp (replicated at tp 4, and for kv1 at tp 2): qwen2 has q/k/v biases,
             # qwen3 a k_norm
             ("llama", {"num_key_value_heads": 1}), ("qwen2", {"num_key_value_heads": 2}),
             ("qwen3", {"num_key_value_heads": 2}),
             # 6 query heads: split unevenly (2+2+1+1) at tp 4
             ("llama", {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 48}),
             ("qwen2", {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 48})]
    for family, extra in cases:
        for native in ([False, True] if family == "llama" else [False]):
            reference = hf_model(family, **extra)
            if native:
                model = Llama(config_from_hf(reference.config.to_dict()))
                model.load_state_dict(reference.state_dict(), strict=False)
                model.model.inv_freq.copy_(reference.model.rotary_emb.inv_freq)
            else:
                model = copy.deepcopy(reference)
            parallelize(model, mesh, sp=True, lp=True)
            with loss_parallel():
                logits = logits_of(model, ids[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(0, 1))
                loss.backward()
            got_logits = full(logits)
            got_grads = {n: full(p.grad) for n, p in model.named_parameters()}
            ref_logits = logits_of(reference, ids[:, :-1])
            F.cross_entropy(ref_logits.flatten(0, 1), ids[:, 1:].flatten(0, 1)).backward()
            ref_grads = dict(reference.named_parameters())
            name = f"{'native' if native else 'hf'}-{family}{'-tied' if extra.get('tie_word_embeddings') else ''}"
            if "num_attention_heads" in extra:
                name += f"-q{extra['num_attention_heads']}"
            if "num_key_value_heads" in extra:
                name += f"-kv{extra['num_key_value_heads']}"
            results[name] = {
                "logits_err": float((got_logits - ref_logits.detach()).abs().max()),
                "grad_err": max(float((got_grads[k] - ref_grads[k].grad).abs().max()) for k in got_grads),
                "grads_compared": len(got_grads),
            }
    return results


GRIDS = {2: [(1, 2), (2, 1)], 4: [(2, 2)]}
"""The 2D grids of each world size: at 2 ranks each grid dimension on its own, at 4 both."""


def grid_parity(world: int) -> dict[str, Any]:
    """The 2D plan (lightning_tp/parallel/grid.py) on transformers Llama (tied and untied), Mistral and Qwen2 (q/k/v
    biases) and our native Llama: logits and every gradient against the single-process transformers model."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    results = {}
    ids = tokens(7)
    for grid in GRIDS[world]:
        mesh = init_device_mesh("cpu", grid, mesh_dim_names=("tp_row", "tp_col"))
        flat = mesh["tp_row", "tp_col"]._flatten("tensor_parallel")
        for family, extra, native in [("llama", {"tie_word_embeddings": True}, False),
                                      ("llama", {"tie_word_embeddings": False}, True),
                                      ("mistral", {}, False), ("qwen2", {}, False)]:
            reference = hf_model(family, **extra)
            model = copy.deepcopy(reference)
            if native:
                model = Llama(config_from_hf(reference.config.to_dict()))
                model.load_state_dict(reference.state_dict(), strict=False)
                model.model.inv_freq.copy_(reference.model.rotary_emb.inv_freq)
            resolved = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True, grid=grid)
            apply_tensor_parallel(model, resolved, flat, grid_mesh=mesh)
            with loss_parallel():
                logits = logits_of(model, ids[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(0, 1)).backward()
            got_grads = {n: full(p.grad) for n, p in model.named_parameters()}
            ref_logits = logits_of(reference, ids[:, :-1])
            F.cross_entropy(ref_logits.flatten(0, 1), ids[:, 1:].flatten(0, 1)).backward()
            ref_grads = dict(reference.named_parameters())
            name = f"{grid[0]}x{grid[1]}-{'native' if native else 'hf'}-{family}"
            name += "-tied" if extra.get("tie_word_embeddings") else ""
            results[name] = {
                "logits_err": float((full(logits) - ref_logits.detach()).abs().max()),
                "grad_err": max(float((got_grads[k] - ref_grads[k].grad).abs().max()) for k in got_grads),
                "grads_compared": len(got_grads),
            }
    return results


def comm_counts(world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    ids = tokens(3)
    counts = {}
    for kind in ("hf", "native"):
        for layers in (1, 2):
            config = transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": layers})
            hf = transformers.LlamaForCausalLM(config)
            model = hf if kind == "hf" else Llama(config_from_hf(config.to_dict()))
            if kind == "native":
                model.init_weights(seed=0)
            parallelize(model, mesh, sp=True, lp=True)
            entry = {}
            for phase in ("forward", "backward"):
                mode = CommDebugMode()
                with mode, loss_parallel():
                    if phase == "forward":
                        logits = logits_of(model, ids[:, :-1])
                        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(0, 1))
                    else:
                        loss.backward()
                entry[phase] = {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}
            counts[f"{kind}/L={layers}"] = entry
    return counts


def main() -> None:
    out_path, world = sys.argv[1], int(sys.argv[2])
    result: dict[str, Any] = {"trainer": trainer_run(world)}
    result["parity"] = parity(world)
    result["grid"] = grid_parity(world)
    result["comm_counts"] = comm_counts(world)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
