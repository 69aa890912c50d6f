"""The multi-GPU checks, one launch on one node: ``torchrun --standalone --nproc-per-node=N
tests/gpu/multi_gpu_worker.py OUT.json`` (N >= 2; ``tests/gpu/test_multi_gpu.py`` launches it and asserts on OUT).

Each case is a Lightning Trainer with ``TensorParallelStrategy`` on the N launched ranks (Lightning sees torchrun's
variables and joins its process group) training the ``debug`` Llama, whose weights are initialised on the CPU before
the strategy shards them, so every case and the reference start from the same weights:

* ``nccl (1, N)`` and, for N >= 4, ``nccl (2, N/2)`` and the 2D ``nccl 2D (N/4, (2, 2))``: fp32, SP + loss
  parallel + FSDP2, four AdamW steps; the reference is the same model trained on ``cuda:0`` alone by rank 0 with a
  plain loop, on the same global batches.
* ``async TP (1, N)``: ``compile=True, async_tp=True`` against ``compile=True`` alone under bf16-mixed; inductor's
  post-grad graphs are inspected for the fused ``symm_mem`` all-gather-matmul and matmul-reduce-scatter ops that the
  micro-pipeline pass inserts.
* ``float8 (N, 1)``: float8 linears with FSDP2 over N GPUs against the same run in bf16; ``float8 (1, N)``: float8
  with tensor parallelism, which the strategy refuses before training with ``UnsupportedFeatureError``.

Rank 0 writes ``{"world", "device", "cases": [{"name", "status": "ran" | "skip" | "error", ...}]}``; a case that raises
is reported with its traceback and the others still run. ``--device cpu`` (gloo) runs the nccl cases' code on CPU
processes and reports the CUDA-only ones skipped: a check of this file where no GPU is.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the repository (lightning_tp) and tests/ (tolerances)

import lightning as L  # noqa: E402 - after the path set-up
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_tp import Llama, TensorParallelStrategy, get_config  # noqa: E402
from lightning_tp.errors import UnsupportedFeatureError  # noqa: E402
from lightning_tp.parallel.dtensor import full  # noqa: E402

SEED, SEQ, GLOBAL_BATCH, STEPS, LR = 0, 64, 4, 4, 3e-3
CONFIG = get_config("debug")


def build() -> Llama:
    model = Llama(CONFIG)  # on the CPU: the weights every case and the reference start from
    model.init_weights(seed=SEED)
    return model


def global_batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ + 1) tokens."""
    return torch.randint(0, CONFIG.vocab_size, (STEPS, GLOBAL_BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(SEED))


def loader(dp: int, dp_rank: int) -> DataLoader:
    """This data-parallel rank's micro-batch of every global batch (contiguous rows), in order."""
    micro = GLOBAL_BATCH // dp
    rows = global_batches()[:, dp_rank * micro:(dp_rank + 1) * micro].flatten(0, 1)
    return DataLoader(TensorDataset(rows[:, :-1], rows[:, 1:]), batch_size=micro)


class Lit(L.LightningModule):
    """A user's module: a Llama built (and initialised) in ``__init__``, ``F.cross_entropy``, AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build()
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        input_ids, labels = batch
        loss = F.cross_entropy(self.model(input_ids).flatten(0, 1).float(), labels.flatten())
        self.losses.append(float(full(loss.detach())))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # foreach=False: the norms' DTensors and the projections' sit on different meshes under SP
        return torch.optim.AdamW(self.parameters(), lr=LR, foreach=False)


def fit(accelerator: str, dp: int, tp: Any, precision: str = "32-true", **strategy: Any) -> dict[str, Any]:
    """Train ``STEPS`` steps at (dp, tp) (``tp`` an int, or a 2D grid ``(r, c)``); every rank's losses, gathered
    (rank order)."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    grid, tp = (tuple(tp), tp[0] * tp[1]) if isinstance(tp, (tuple, list)) else (None, tp)
    module = Lit()
    trainer = L.Trainer(accelerator=accelerator, devices=world, max_steps=STEPS, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False,
                        strategy=TensorParallelStrategy(data_parallel_size=dp, tensor_parallel_size=grid or tp,
                                                        timeout=300, **strategy))
    trainer.fit(module, loader(dp, rank // tp))  # the mesh is (dp, tp), tp innermost: dp rank = rank // tp
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, module.losses)
    return {"dp": dp, "tp": tp, "grid": grid, "losses": everyone}


def reference(device: str) -> list[float]:
    """The loss of each global batch, trained on one device with the same model, data and optimizer."""
    model = build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    losses = []
    for tokens in global_batches().to(device):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


class FusedOps:
    """An inductor post-grad pass that counts the ``symm_mem`` fused collective-matmul ops in every graph compiled
    (after the micro-pipeline pass, which inserts them); it changes nothing."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and "symm_mem" in str(node.target):
                self.counts[str(node.target)] += 1

    def uuid(self) -> None:
        return None  # no cache key: graphs compiled with this pass are not cached


def async_tp(accelerator: str, tp: int) -> dict[str, Any]:
    import torch._dynamo
    from torch._inductor import config as inductor_config

    plain = fit(accelerator, 1, tp, "bf16-mixed", compile=True)
    torch._dynamo.reset()
    fused = FusedOps()
    with inductor_config.patch(post_grad_custom_post_pass=fused, fx_graph_cache=False):
        overlapped = fit(accelerator, 1, tp, "bf16-mixed", compile=True, async_tp=True)
    torch._dynamo.reset()
    return {"losses": overlapped["losses"], "ref_losses": plain["losses"], "fused_ops": dict(fused.counts)}


def float8(accelerator: str, world: int) -> dict[str, Any]:
    bf16 = fit(accelerator, world, 1, "bf16-mixed")
    f8 = fit(accelerator, world, 1, "bf16-mixed", float8=True)
    return {"losses": f8["losses"], "ref_losses": bf16["losses"]}


def float8_with_tp(accelerator: str, world: int) -> dict[str, Any]:
    try:
        fit(accelerator, 1, world, "bf16-mixed", float8=True)
    except UnsupportedFeatureError as e:
        return {"refused": True, "message": str(e)}
    return {"refused": False, "message": ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    float8_ok = (cuda and torch.cuda.get_device_capability() >= (8, 9)
                 and importlib.util.find_spec("torchao") is not None)
    cases: list[tuple[str, Any, str]] = [(f"nccl (1, {world})", lambda: fit(args.device, 1, world), "")]
    if world >= 4 and world % 2 == 0:
        cases.append((f"nccl (2, {world // 2})", lambda: fit(args.device, 2, world // 2), ""))
        # 2D tensor parallelism: a 2 x 2 grid (the debug model's 4 KV heads split over its 4 devices)
        cases.append((f"nccl 2D ({world // 4}, (2, 2))", lambda: fit(args.device, world // 4, (2, 2)), ""))
    cases += [
        (f"async TP (1, {world})", lambda: async_tp(args.device, world), "" if cuda else "async TP needs CUDA"),
        (f"float8 ({world}, 1)", lambda: float8(args.device, world),
         "" if float8_ok else "float8 needs CUDA capability >= 8.9 and torchao"),
        (f"float8 (1, {world})", lambda: float8_with_tp(args.device, world), "" if cuda else "float8 needs CUDA"),
    ]
    results = []
    for name, run, skip in cases:
        start = time.perf_counter()
        if skip:
            results.append({"name": name, "status": "skip", "reason": skip})
            continue
        try:
            result = {"name": name, "status": "ran", **run()}
        except Exception:  # reported, and the next case still runs (a rank that fails alone would hang the rest)
            result = {"name": name, "status": "error", "error": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        results.append(result)
    ref = reference(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu") if rank == 0 else None
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "device": args.device, "ref_losses": ref,
                                              "cases": results}, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # before exit: gloo's threads abort a process that exits with them running
    return 0


if __name__ == "__main__":
    sys.exit(main())
