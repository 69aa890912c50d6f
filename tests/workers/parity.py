"""Multi-process worker for the numerics tests: ``python tests/workers/parity.py OUT.json SPEC.json``.

Launched by the tests as a script, exactly as a user would run one: Lightning's launcher re-runs this
file for ranks 1..N-1. One launch runs several Trainer configurations (sharing one process group) so
that the ~7 s Lightning import is paid once. Global rank 0 writes what every rank saw, together with an
independent single-process reference computed with a plain ``Llama`` and ``torch.optim.AdamW`` (or SGD),
clipped with ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``.

Gradients are compared after clipping: Lightning calls ``on_before_optimizer_step`` *before* it clips
(``Precision._after_closure``, Lightning 2.6), so the clipped gradients are recorded in the module's
``configure_gradient_clipping`` right after the strategy's clipping ran.
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
from torch.utils.data import DataLoader, TensorDataset

from lightning_tp import Llama, TensorParallelStrategy, get_config
from lightning_tp.parallel.grad_norm import total_grad_norm

CONFIG = get_config("debug")  # 2 layers, h=64, 8 heads, 4 kv heads, vocab 512
SEQ, MICRO_BATCH, STEPS, LR, WEIGHT_DECAY, CLIP = 16, 2, 5, 1e-3, 0.1, 0.5
# Value clipping clamps ~5% of the Llama's gradient elements (and every element of the extra head's).
CLIP_VALUE, SGD_LR = 0.01, 0.5
# The extra head's loss is scaled so its gradient norm (~2.6) is as large as the Llama's (~2.7): a norm that
# counts the head's replicated copies twice, or drops it, is off by far more than the tolerance.
HEAD_OUT, HEAD_SCALE = 4, 10.0


def initial_weights() -> dict[str, torch.Tensor]:
    model = Llama(CONFIG)
    model.init_weights(seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def dataset(dp: int, accumulate: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, CONFIG.vocab_size, (STEPS * accumulate * MICRO_BATCH * dp, SEQ + 1), generator=g)


def ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))


def initial_head() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        head = nn.Linear(SEQ, HEAD_OUT)
    return {k: v.clone() for k, v in head.state_dict().items()}


def head_loss(head: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A user's extra objective on a module the plan does not cover (a plain-tensor input, so no TP)."""
    return HEAD_SCALE * head(tokens[:, :-1].float() / CONFIG.vocab_size).pow(2).mean()


def make_optimizer(params: Any, optim: str) -> torch.optim.Optimizer:
    if optim == "sgd":
        return torch.optim.SGD(params, lr=SGD_LR)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


class LitLlama(L.LightningModule):
    """What a user writes: build a Llama, call F.cross_entropy. No parallelisation code."""

    def __init__(self, weights: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None = None,
                 optim: str = "adamw") -> None:
        super().__init__()
        self.model = Llama(CONFIG)
        self.model.load_state_dict(weights)
        if head is not None:  # left out of the plan: FSDP2 puts it on the dp mesh only (plain with fsdp=False)
            self.head = nn.Linear(SEQ, HEAD_OUT)
            self.head.load_state_dict(head)
        self.optim = optim
        self.losses: list[float] = []
        self.logits_types: set[str] = set()
        self.clipped_grads: dict[str, torch.Tensor] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        logits = self.model(tokens[:, :-1])
        self.logits_types.add(f"{type(logits).__name__}{getattr(logits, 'placements', '')}/{logits.dtype}")
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))
        if hasattr(self, "head"):
            loss = loss + head_loss(self.head, tokens)
        self.losses.append(loss.detach().float().item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optim)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not self.clipped_grads:  # first optimizer step, after the strategy's clipping
            self.clipped_grads = {_name(n): full(p.grad) for n, p in self.named_parameters()}


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


def _name(n: str) -> str:
    return n.removeprefix("model.")


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.grads: dict[str, torch.Tensor] = {}
        self.grad_norm: float | None = None
        self.params: dict[str, torch.Tensor] = {}
        self.sync_calls: list[int] = []  # FSDP reduce-scatters issued during each micro-batch
        self._count = 0
        self._original = dist.reduce_scatter_single

        def counting(*args: Any, **kwargs: Any) -> Any:
            self._count += 1
            return self._original(*args, **kwargs)

        dist.reduce_scatter_single = counting

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(int((batch[0].long() * torch.arange(1, batch[0].numel() + 1).view_as(batch[0])).sum()))
        self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sync_calls.append(self._count)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Lightning calls this before clipping: the unclipped gradients and their mesh-aware norm
        if not self.grads:  # first optimizer step: every rank takes part in the gathers
            self.grads = {_name(n): full(p.grad) for n, p in pl_module.named_parameters()}
            self.grad_norm = float(total_grad_norm(pl_module.parameters()))

    def on_train_end(self, trainer, pl_module):
        self.params = {_name(n): full(p) for n, p in pl_module.named_parameters()}
        dist.reduce_scatter_single = self._original


def reference(dp: int, accumulate: int, weights: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None = None,
              optim: str = "adamw", clip_algorithm: str = "norm") -> dict[str, Any]:
    """Single process, plain model, fp32; the data split Lightning's Trainer uses for training (a shuffled
    DistributedSampler over the dp ranks, seed 0, epoch 0). Torch's own clipping."""
    from torch.utils.data import DistributedSampler

    torch.manual_seed(0)
    llama = Llama(CONFIG)
    llama.load_state_dict(weights)
    model = nn.ModuleDict({"model": llama})
    if head is not None:
        model["head"] = nn.Linear(SEQ, HEAD_OUT)
        model["head"].load_state_dict(head)
    opt = make_optimizer(model.parameters(), optim)
    data = dataset(dp, accumulate)
    per_rank = [data[list(DistributedSampler(data, num_replicas=dp, rank=r, shuffle=True, seed=0))]
                for r in range(dp)]
    losses: dict[int, list[float]] = {r: [] for r in range(dp)}
    out: dict[str, Any] = {}
    for step in range(STEPS):
        total = 0.0
        for a in range(accumulate):
            i = (step * accumulate + a) * MICRO_BATCH
            for r in range(dp):
                batch = per_rank[r][i:i + MICRO_BATCH]
                loss = ce(llama(batch[:, :-1]), batch)
                if head is not None:
                    loss = loss + head_loss(model["head"], batch)
                losses[r].append(loss.item())
                total = total + loss / (dp * accumulate)
        total.backward()
        if step == 0:
            grads = {_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}
            out["grads"] = grads  # compared with the Trainer's gradients before clipping
            out["grad_norm"] = float(torch.nn.utils.get_total_norm(list(grads.values())))
            out["head_norm"] = float(torch.nn.utils.get_total_norm(
                [g for n, g in grads.items() if n.startswith("head.")] or [torch.zeros(1)]))
            out["grad_absmax"] = max(float(g.abs().max()) for g in grads.values())
        if clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), CLIP_VALUE)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if step == 0:
            out["clipped_grads"] = {_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    out["losses"] = losses
    out["params"] = {_name(n): p.detach().clone() for n, p in model.named_parameters()}
    return out


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b}


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) for k in b}


def run_case(case: dict[str, Any], devices: int, num_nodes: int) -> dict[str, Any] | None:
    dp, tp = case.get("dp", "auto"), case.get("tp", "auto")
    # the data set is sized for the resolved dp; "auto" resolves to the number of nodes
    dp_resolved = dp if dp != "auto" else (num_nodes if tp == "auto" else devices * num_nodes // tp)
    accumulate = case.get("accumulate", 1)
    clip_algorithm, optim = case.get("clip", "norm"), case.get("optim", "adamw")
    weights, head = initial_weights(), (initial_head() if case.get("head") else None)
    module = LitLlama(weights, head, optim)
    recorder = Recorder()
    start = time.perf_counter()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=TensorParallelStrategy(
            data_parallel_size=dp, tensor_parallel_size=tp,
            sequence_parallel=case["sp"], loss_parallel=case["lp"],
            activation_checkpointing=case.get("ac", "none"), compile=case.get("compile", False),
            fsdp=case.get("fsdp", True), reshard_after_forward=case.get("reshard", True),
            save_sharded_inputs=case.get("sharded", False),
        ),
        precision=case.get("precision", "32-true"),
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=CLIP_VALUE if clip_algorithm == "value" else CLIP,
        gradient_clip_algorithm=clip_algorithm,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, DataLoader(TensorDataset(dataset(dp_resolved, accumulate)), batch_size=MICRO_BATCH))
    mesh = trainer.strategy.device_mesh
    mine = {
        "rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "sizes": [trainer.strategy.data_parallel_size, trainer.strategy.tensor_parallel_size],
        "dp_rank": mesh["data_parallel"].get_local_rank(),
        "tp_group": sorted(dist.get_process_group_ranks(mesh["tensor_parallel"].get_group())),
        "losses": module.losses,
        "batches": recorder.batches,
        "sync_calls": recorder.sync_calls,
        "logits_types": sorted(module.logits_types),
        "logged_loss": float(trainer.callback_metrics["train_loss"]),
        "state_dict_keys": sorted(module.state_dict()),
        # where each parameter lives: "Tensor", or "DTensor" + the mesh dim names
        "param_meshes": {_name(n): type(p).__name__ + (str(p.device_mesh.mesh_dim_names) if hasattr(p, "device_mesh")
                                                        else "") for n, p in module.named_parameters()},
        "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
    }
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if trainer.global_rank != 0:
        return None
    seconds = time.perf_counter() - start
    ref = reference(dp_resolved, accumulate, weights, head, optim, clip_algorithm)
    result = {**case, "ranks": everyone, "ref_losses": ref["losses"], "grad_norm": recorder.grad_norm,
              "ref_grad_norm": ref["grad_norm"], "ref_head_norm": ref["head_norm"],
              "ref_grad_absmax": ref["grad_absmax"], "seconds": seconds,
              "clipped_absmax": max(float(g.abs().max()) for g in module.clipped_grads.values()),
              "ref_clipped_norm": float(torch.nn.utils.get_total_norm(list(ref["clipped_grads"].values())))}
    if case.get("precision", "32-true") == "32-true":
        result["unclipped_grad_abs_err"] = max_abs(recorder.grads, ref["grads"])
        result["grad_abs_err"] = max_abs(module.clipped_grads, ref["clipped_grads"])
        result["param_abs_err"] = max_abs(recorder.params, ref["params"])
        result["param_rel_err"] = max_rel(recorder.params, ref["params"])
    return result


def causal_lm(devices: int) -> dict[str, Any] | None:
    """The library's own CausalLMModule, built on the meta device and initialised by the strategy from
    ``init_seed``, with ignore-index labels, validation, and the throughput callback (dp=2 × tp=2)."""
    from torch.utils.data import Dataset

    from lightning_tp import CausalLMModule, ThroughputMonitor

    class Tokens(Dataset):
        def __init__(self, n: int, seed: int) -> None:
            self.data = torch.randint(0, CONFIG.vocab_size, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            labels = self.data[i, 1:].clone()
            labels[: 4 + i % 3] = -100  # a masked "prompt" of varying length
            return {"input_ids": self.data[i, :-1], "labels": labels}

    class Seen(L.Callback):
        """What each rank was fed, recorded outside the module: unmasked labels per step, the last validation."""

        def __init__(self) -> None:
            self.tokens: list[int] = []
            self.val: list[tuple[torch.Tensor, torch.Tensor]] = []

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.tokens.append(int((batch["labels"] != -100).sum()))

        def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            self.val = []

        def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                      dataloader_idx: int = 0) -> None:
            self.val.append((batch["input_ids"].clone(), batch["labels"].clone()))

    seen = Seen()
    module = CausalLMModule("debug", init_seed=7, lr=1e-3, warmup_steps=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices,
        strategy=TensorParallelStrategy(data_parallel_size=2, tensor_parallel_size=devices // 2),
        max_steps=6, val_check_interval=3, limit_val_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ThroughputMonitor(warmup_steps=1), seen],
    )
    train, val = Tokens(48, 1), Tokens(16, 2)
    trainer.fit(module, DataLoader(train, batch_size=MICRO_BATCH), DataLoader(val, batch_size=MICRO_BATCH))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    weights = {_name(n): full(p) for n, p in module.named_parameters()}  # a collective: every rank takes part
    dp_rank = trainer.strategy.device_mesh["data_parallel"].get_local_rank()
    fed: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(fed, (dp_rank, seen.tokens, seen.val))
    if trainer.global_rank != 0:
        return None
    by_dp = {dp: (tokens, batches) for dp, tokens, batches in fed}  # TP ranks of a replica were fed the same
    # The last validation's loss, independently: one process, float64, the trained weights, every replica's batches.
    reference = Llama(CONFIG)
    reference.load_state_dict(weights)
    reference.double()
    total, count = 0.0, 0
    with torch.no_grad():
        for _, batches in by_dp.values():
            for input_ids, labels in batches:
                logits = reference(input_ids).double()
                total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), ignore_index=-100,
                                               reduction="sum"))
                count += int((labels != -100).sum())
    return {"metrics": metrics, "dp": 2, "tokens_per_step": 2 * MICRO_BATCH * SEQ,
            "expected_tokens_last_step": sum(tokens[-1] for tokens, _ in by_dp.values()),
            "expected_tokens_seen": sum(sum(tokens) for tokens, _ in by_dp.values()),
            "expected_val_loss": total / count, "val_tokens": count, "steps": [len(t) for t, _ in by_dp.values()]}


def initial_weights_match(devices: int) -> dict[str, Any] | None:
    """Meta-device build + strategy materialisation gives the same weights as one process, same seed."""
    from lightning_tp import CausalLMModule

    module = CausalLMModule("debug", init_seed=7)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices,
        strategy=TensorParallelStrategy(data_parallel_size=2, tensor_parallel_size=devices // 2),
        max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, SEQ + 1, dtype=torch.long)), batch_size=2))
    ours = {_name(n): full(p) for n, p in module.named_parameters()}
    if trainer.global_rank != 0:
        return None
    reference = Llama(CONFIG)
    reference.init_weights(seed=7)
    return {"max_abs_err": max_abs(ours, dict(reference.named_parameters())), "n": len(ours)}


def checkpoint_across_modes(devices: int, root: str) -> dict[str, Any] | None:
    """Save after 2 steps with full activation checkpointing, then resume that checkpoint to step 4 twice: without
    activation checkpointing, and with selective checkpointing + compiled blocks. Both must continue the
    uninterrupted 4-step run (a resume that lost the weights or the optimizer state would not)."""

    def fit(ac: str, steps: int, compile: bool = False, save: str | None = None, resume: str | None = None) -> list:
        module = LitLlama(initial_weights())
        trainer = L.Trainer(
            accelerator="cpu", devices=devices,
            strategy=TensorParallelStrategy(tensor_parallel_size=devices, activation_checkpointing=ac, compile=compile),
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        # Every sample the same: the sampler Lightning injects shuffles, and a plain DataLoader has no saved
        # position, so a resumed run draws another order; with identical samples every order gives the batches
        # of the uninterrupted run, and what is compared is the weights and the optimizer state.
        data = DataLoader(TensorDataset(dataset(1, 1)[:1].repeat(4 * MICRO_BATCH, 1)), batch_size=MICRO_BATCH)
        trainer.fit(module, data, ckpt_path=resume)
        if save:
            trainer.save_checkpoint(save)
        return module.losses

    path = f"{root}/ac_full_step2"
    uninterrupted = fit("none", 4)  # the reference: the same 4 steps without a save and a resume
    first = fit("full", 2, save=path)
    plain = fit("none", 4, resume=path)
    selective_compiled = fit("selective", 4, compile=True, resume=path)
    if dist.get_rank() != 0:
        return None
    return {"uninterrupted": uninterrupted, "first": first, "plain": plain, "selective_compiled": selective_compiled}


def _collective_counter() -> Any:
    """A dispatch mode counting functional collectives (what DTensor issues), also during recomputation in
    backward, where ``CommDebugMode``'s module tracker fails."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if any(t is DTensor for t in types):
                return NotImplemented  # let DTensor decompose first; its collectives come back here
            if func.namespace == "_c10d_functional" and func._opname not in ("wait_tensor", "_wrap_tensor_autograd"):
                self.counts[func._opname] = self.counts.get(func._opname, 0) + 1
            return func(*args, **(kwargs or {}))

    return Counter()


def comm_counts() -> dict[str, Any]:
    """Collectives per forward and backward for 1 and 2 layers at tp = world size, per plan and flag set."""
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from lightning_tp.parallel.plans import resolve_plan
    from lightning_tp.parallel.recompute import apply_activation_checkpointing

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for plan, sp, lp, ac in [("llama", False, False, "none"), ("llama", True, False, "none"),
                             ("llama", True, True, "none"), ("llama_per_projection", False, False, "none"),
                             ("llama", True, True, "selective"), ("llama", True, True, "full"),
                             ("llama", False, False, "selective")]:
        for layers in (1, 2):
            model = Llama(get_config("debug", num_hidden_layers=layers))
            model.init_weights(seed=0)
            resolved = resolve_plan(model, plan, sequence_parallel=sp, loss_parallel=lp)
            parallelize_module(model, mesh, resolved.styles)
            apply_activation_checkpointing(model, resolved, ac)
            tokens = torch.randint(0, CONFIG.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
            counts = {}
            for phase in ("forward", "backward"):
                mode = CommDebugMode() if ac == "none" else _collective_counter()
                with mode, (loss_parallel() if lp else contextlib.nullcontext()):
                    if phase == "forward":
                        loss = ce(model(tokens[:, :-1]), tokens)
                    else:
                        loss.backward()
                counts[phase] = (mode.counts if ac != "none" else
                                 {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()})
            results[f"{plan}/sp={sp}/lp={lp}{'' if ac == 'none' else '/ac=' + ac}/L={layers}"] = counts
    if dist.get_world_size() == 4:
        results.update(grid_comm_counts())
    return results


def grid_comm_counts() -> dict[str, Any]:
    """The same counts for the 2D plan on a 2 × 2 grid (lightning_tp/parallel/grid.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("tp_row", "tp_col"))
    flat = grid["tp_row", "tp_col"]._flatten("tensor_parallel")
    results = {}
    for layers in (1, 2):
        model = Llama(get_config("debug", num_hidden_layers=layers))
        model.init_weights(seed=0)
        resolved = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True, grid=(2, 2))
        apply_tensor_parallel(model, resolved, flat, grid_mesh=grid)
        tokens = torch.randint(0, CONFIG.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
        counts = {}
        for phase in ("forward", "backward"):
            mode = CommDebugMode()
            with mode, loss_parallel():
                if phase == "forward":
                    loss = ce(model(tokens[:, :-1]), tokens)
                else:
                    loss.backward()
            counts[phase] = {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}
        results[f"grid/L={layers}"] = counts
    return results


def main() -> None:
    out_path, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    results = [run_case(case, spec["devices"], spec.get("num_nodes", 1)) for case in spec["cases"]]
    extra = {}
    if spec.get("causal_lm"):
        extra["causal_lm"] = causal_lm(spec["devices"])
        extra["init"] = initial_weights_match(spec["devices"])
    if spec.get("checkpoint_across_modes"):
        extra["checkpoint_across_modes"] = checkpoint_across_modes(spec["devices"], spec["checkpoint_across_modes"])
    counts = comm_counts() if spec.get("comm_counts") else None
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"cases": results, "comm_counts": counts, **extra}, f)


if __name__ == "__main__":
    main()
