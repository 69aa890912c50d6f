"""Multi-process worker for LoRA under tensor parallelism (issue 16):
``python tests/workers/lora.py OUT.json SPEC.json``.

SPEC: ``{"devices": world size, "dir": a scratch directory, "cases": [{"name", "dp", "tp", "model", "resume_from"?,
"strategy"?: more TensorParallelStrategy arguments}, ...], "collectives": bool, "bf16": bool}``. Each case wraps a
small transformers Llama in ``peft.get_peft_model`` (every projection targeted, both factors random so that every
adapter gradient is non-zero), trains it with AdamW under ``TensorParallelStrategy()`` defaults (SP, loss parallel,
FSDP2) for ``EPOCHS`` epochs of ``STEPS_PER_EPOCH`` steps, saving a checkpoint after the first epoch and resuming a
fresh model from it for the second. A case with ``resume_from`` starts instead from the checkpoint another case
wrote at another (dp, tp). Rank 0 then runs the same PEFT model in one process on the same samples and reports: the
loss of every step on every rank, every adapter gradient element at every step, whether the frozen base is
bit-identical before and after and never had a gradient or optimizer state, the checkpoint's keys and bytes against
the full model's.

``"collectives": true`` also counts the collectives per decoder layer (``CommDebugMode``, a 2-layer model minus a
1-layer one, forward and backward) with LoRA and without, for both models. One launch runs every case of a
world size. ``"bf16": true`` trains one epoch under ``bf16-mixed`` and reports the parameters' dtypes. Every case
also writes its final checkpoint (``DIR/<name>-final``) and the final model's logits on one sample, for the
exported adapters to reproduce.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import peft
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tp import TensorParallelStrategy
from lightning_tp.checkpoint.hf_family import model_layout

VOCAB, SEQ, GLOBAL_BATCH, STEPS_PER_EPOCH, EPOCHS, LR = 64, 16, 2, 2, 2, 0.02
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    # query:KV heads; "9:3" is SmolLM2's: at tp 2 and 4 the query heads split unevenly and the KV heads are
    # replicated with per-rank selection (lightning_tp/parallel/heads.py)
    "8:4": dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=32),
    "9:3": dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=36),
    # Phi-3: fused qkv_proj and gate_up_proj (lightning_tp/parallel/fused.py), whose lora_B follows the grouped rows
    "phi3": dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=32),
}
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def build(model: str, layers: int = 2, lora: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, intermediate_size=64, num_hidden_layers=layers, max_position_embeddings=64,
                 **MODELS[model])
    if model == "phi3":
        base = transformers.Phi3ForCausalLM(transformers.Phi3Config(**shape, pad_token_id=0, bos_token_id=1,
                                                                     eos_token_id=1))
    else:
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, head_dim=4))
    if not lora:
        return base
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=FUSED_TARGETS if model == "phi3" else TARGETS)
    return peft.get_peft_model(base, config)


def samples() -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS_PER_EPOCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(5))


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


class Lit(L.LightningModule):
    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = build(model)
        self.losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = loss_of(self.model, batch[0])
        self.losses.append(loss.detach().item())
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.grads.append({n: full(p.grad) for n, p in self.named_parameters() if p.requires_grad})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)  # as users write it: frozen parameters included


def fit(case: dict[str, Any], spec: dict[str, Any], epochs: int, ckpt: str | None,
        precision: str = "32-true") -> tuple[Lit, L.Trainer]:
    module = Lit(case["model"])
    trainer = L.Trainer(accelerator="cpu", devices=spec["devices"], max_epochs=epochs, logger=False,
                        precision=precision, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        strategy=TensorParallelStrategy(data_parallel_size=case["dp"], tensor_parallel_size=case["tp"],
                                                        **case.get("strategy", {})))
    loader = DataLoader(TensorDataset(samples()), batch_size=GLOBAL_BATCH // case["dp"])
    trainer.fit(module, loader, ckpt_path=ckpt)
    return module, trainer


def reference(model: str, dps: list[int]) -> dict[str, Any]:
    """The same PEFT model in one process, epoch ``e`` at ``dps[e]`` data-parallel ranks (the samples each rank
    sees come from Lightning's ``DistributedSampler``: shuffled, seed 0): per step, each rank's micro-batch loss
    and every adapter gradient of the global batch."""
    lit = Lit(model)
    opt = lit.configure_optimizers()
    data = samples()
    losses, grads = [], []
    for epoch, dp in enumerate(dps):
        orders = []
        for rank in range(dp):
            sampler = DistributedSampler(data, num_replicas=dp, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        micro = GLOBAL_BATCH // dp
        for step in range(STEPS_PER_EPOCH):
            per_rank = [loss_of(lit.model, data[order[step * micro:(step + 1) * micro]]) for order in orders]
            losses.append([x.item() for x in per_rank])
            (sum(per_rank) / dp).backward()
            grads.append({n: p.grad.detach().clone() for n, p in lit.named_parameters() if p.requires_grad})
            opt.step()
            opt.zero_grad()
    return {"losses": losses, "grads": grads}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_case(case: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any] | None:
    start = time.perf_counter()
    ckpt = Path(spec["dir"]) / f"{case['name']}-epoch1"
    first: Lit | None = None
    if case.get("resume_from"):
        source = str(Path(spec["dir"]) / f"{case['resume_from']}-epoch1")
        second, trainer = fit(case, spec, EPOCHS, source)
    else:
        first, trainer = fit(case, spec, 1, None)
        base_before = {n: full(p) for n, p in first.named_parameters() if not p.requires_grad}
        trainer.save_checkpoint(ckpt)
        second, trainer = fit(case, spec, EPOCHS, str(ckpt))
    trainer.save_checkpoint(Path(spec["dir"]) / f"{case['name']}-final")
    frozen = [(n, p) for n, p in second.named_parameters() if not p.requires_grad]
    opt = trainer.optimizers[0]
    stateful = {id(p) for p in opt.state if opt.state[p]}
    report = {
        "dp_rank": trainer.strategy.device_mesh["data_parallel"].get_local_rank(),
        "losses": (first.losses if first else []) + second.losses,
        "frozen_grads": sum(p.grad is not None for _, p in frozen),
        "frozen_with_state": sum(id(p) in stateful for _, p in frozen),
        "trainable_with_state": len(stateful),
        "frozen_dtypes": sorted({str(p.dtype) for _, p in frozen}),
        # FSDP2 shards what trains: the frozen base stays on the TP mesh alone
        "frozen_meshes": sorted({str(p.device_mesh.mesh_dim_names) for _, p in frozen if isinstance(p, DTensor)}),
        "trained_meshes": sorted({str(p.device_mesh.mesh_dim_names) for p in second.parameters()
                                  if p.requires_grad and isinstance(p, DTensor)}),
    }
    base_after = {n: full(p) for n, p in frozen}
    with torch.no_grad():  # what the exported adapters must reproduce (after the report: FSDP2 keeps the last
        logits = full(second.model(input_ids=samples()[:1, :-1]).logits)  # block unsharded after a forward)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, report)
    seconds = time.perf_counter() - start
    if trainer.global_rank != 0:
        return None
    source = next((c for c in spec["cases"] if c["name"] == case.get("resume_from")), case)
    ref = reference(case["model"], [source["dp"]] + [case["dp"]] * (EPOCHS - 1))
    # in the model's own layout: Phi-3's fused projections keep grouped rows, their lora_B too
    pristine_lit = Lit(case["model"])
    pristine = pristine_lit.model

    def own(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # the plan applies at tp > 1 only
        return model_layout(pristine_lit, state) if case["tp"] > 1 else state

    grads = [own(g) for g in (first.grads if first else []) + second.grads]
    base_after = own(base_after)
    offset = 0 if first else STEPS_PER_EPOCH  # a resumed case trains the second epoch only
    ref["losses"] = ref["losses"][offset:]
    grad_err = [max(float((g[n] - ref["grads"][i + offset][n]).abs().max()) for n in g) for i, g in enumerate(grads)]
    result = {**case, "ranks": everyone, "logits": logits.tolist(), "ref_losses": ref["losses"], "grad_err": grad_err,
              "grad_absmax": max(float(g.abs().max()) for step in ref["grads"] for g in step.values()),
              "adapters": len(ref["grads"][0]), "seconds": round(seconds, 1),
              "base_identical": all(torch.equal(base_after[f"model.{n}"], full(p))
                                    for n, p in pristine.named_parameters() if not p.requires_grad)}
    if first:
        result["base_identical"] = result["base_identical"] and all(
            torch.equal(own(base_before)[n], base_after[n]) for n in base_after)
        metadata = torch.distributed.checkpoint.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        keys = sorted(metadata)
        tensors = [m for m in metadata.values() if hasattr(m, "size")]
        result["checkpoint"] = {
            "model_keys": [k for k in keys if k.startswith("state_dict.")],
            "optimizer_keys": len([k for k in keys if k.startswith("optimizer_")]),
            "bytes": dir_bytes(ckpt),
            "tensor_bytes": sum(m.size.numel() * torch.empty((), dtype=m.properties.dtype).element_size()
                                for m in tensors),
            "full_model_bytes": sum(p.numel() * p.element_size() for p in pristine.parameters()),
            "adapter_bytes": sum(p.numel() * p.element_size() for p in pristine.parameters() if p.requires_grad)}
    return result


def bf16_check(spec: dict[str, Any]) -> dict[str, Any]:
    """One epoch under ``bf16-mixed``: the frozen base must be held in bf16 only, the adapters as fp32 masters."""
    case = {"name": "bf16", "dp": 1, "tp": spec["devices"], "model": "8:4"}
    module, trainer = fit(case, spec, 1, None, precision="bf16-mixed")
    params = list(module.parameters())
    return {"frozen_dtypes": sorted({str(p.dtype) for p in params if not p.requires_grad}),
            "trained_dtypes": sorted({str(p.dtype) for p in params if p.requires_grad}),
            "losses": module.losses}


def collectives(tp: int) -> dict[str, Any]:
    """Collectives per decoder layer, forward and backward, with and without LoRA, on a ``tp``-rank mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    mesh = init_device_mesh("cpu", (tp,))
    tokens = samples()[:GLOBAL_BATCH]
    out: dict[str, Any] = {}
    for model in ("8:4", "9:3"):
        counts = {}
        for lora in (True, False):
            for layers in (1, 2):
                net = build(model, layers, lora)
                plan = resolve_plan(net, "auto", sequence_parallel=True, loss_parallel=True)
                apply_tensor_parallel(net, plan, mesh)
                per_phase = {}
                for phase in ("forward", "backward"):
                    with CommDebugMode() as comm:
                        if phase == "forward":
                            logits = net(input_ids=tokens[:, :-1]).logits
                        else:
                            with loss_parallel():
                                F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1)).backward()
                    per_phase[phase] = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
                counts[(lora, layers)] = per_phase
        out[model] = {("lora" if lora else "base"): {
            phase: {op: counts[(lora, 2)][phase].get(op, 0) - counts[(lora, 1)][phase].get(op, 0)
                    for op in set(counts[(lora, 2)][phase]) | set(counts[(lora, 1)][phase])}
            for phase in ("forward", "backward")} for lora in (True, False)}
    return out


def main() -> None:
    out_path, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    results = []
    for case in spec["cases"]:
        results.append(run_case(case, spec))
        dist.barrier()  # rank 0's reference runs while the others wait here, not inside the next fit
    extra = collectives(dist.get_world_size()) if spec.get("collectives") else None
    bf16 = bf16_check(spec) if spec.get("bf16") else None
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"cases": results, "collectives": extra, "bf16": bf16}, f)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
