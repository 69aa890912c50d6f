"""LoRA against full fine-tuning on the same model and layout: CPU tokens/s, memory per rank, collectives.

    python -m benchmarks lora [--quick] [--pairs N] [--steps N] [--preset small]

Every variant trains the native Llama (the ``small`` preset by default) in a LightningModule under
``TensorParallelStrategy`` defaults at dp=1 × tp=2 (sequence parallel, loss parallel, FSDP2), 2 ranks × 1
thread, fp32, ``AdamW(self.parameters())`` as a user writes it. The LoRA side wraps the same model in
``peft.get_peft_model`` with the recipe's ``peft=lora`` defaults: ``LoraConfig(r=16, lora_alpha=32,
lora_dropout=0.05)`` on all seven projections. A third variant, LoRA with ``lora_dropout=0``, shows what
PEFT's dropout costs: each adapter draws its own mask over its input, and under SP the input of q, k, v,
gate and up is the whole gathered sequence on every rank.

* **tokens/s**: paired runs in alternating order (LoRA, full, LoRA dropout 0, then reversed), warm-up steps
  untimed; medians of each variant and of the per-pair ratios to full fine-tuning.
* **bytes held per rank**: parameters, gradients and optimizer state counted from the tensors at the last
  step (a DTensor counts its local shard), each split into trainable and frozen.
* **peak RSS per rank**: before each run the process returns its freed heap to the system
  (``malloc_trim``) and resets the kernel's peak-RSS mark (``/proc/self/clear_refs``); the run's ``VmHWM``
  is its peak, and the peak minus the RSS at its start is what the run added (model, optimizer,
  activations, allocator slack). Where the mark cannot be reset, the process's ``ru_maxrss`` is reported
  instead, which only grows over the runs.
* **collectives**: per decoder layer, counted as in :mod:`benchmarks.comm` (a 2-layer model minus a 1-layer
  one) but parallelized as the strategy does it, TP then FSDP2, so that forward, backward and the optimizer
  step include the gradient reductions FSDP2 issues; with LoRA and without. And per whole training step in
  the Trainer, counted on its last untimed warm-up step.
* **saved for backward per layer**: the bytes of the unique storages ``saved_tensors_hooks`` sees in the
  same 2-layer minus 1-layer forward, parameters (FSDP2's unsharded ones included) left out.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

from benchmarks._common import BenchmarkError, bench_config, paired_summary, table

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("lora", "full", "lora_no_dropout")
"""What each Trainer run trains: LoRA as the recipe sets it, the full model, LoRA with ``lora_dropout=0``."""
PHASES = ("forward", "backward", "optimizer")
SHORT = {"all_reduce": "AR", "all_gather_into_tensor": "AG", "reduce_scatter_tensor": "RS", "all_to_all_single": "A2A"}


def lora_config(lora_rank: int = 16, lora_dropout: float = 0.05) -> Any:
    """The adapters the recipe's ``peft=lora`` group trains (``conf/peft/lora.yaml``)."""
    from peft import LoraConfig

    return LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=lora_dropout, target_modules=list(TARGETS))


def build(config: Any, lora: bool, lora_rank: int = 16, lora_dropout: float = 0.05) -> Any:
    """The native Llama initialised with seed 0, wrapped in PEFT when ``lora``."""
    from lightning_tp.models import Llama

    model = Llama(config)
    model.init_weights(seed=0)
    if not lora:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora_rank, lora_dropout))


# ----------------------------------------------------------------------------- memory


def _local_bytes(t: Any) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def held_bytes(module: Any, optimizer: Any, grads: bool = True) -> dict[str, int]:
    """Bytes of the parameters, gradients and optimizer state this rank holds, trainable and frozen apart."""
    import torch

    out = dict.fromkeys(("trainable_params", "frozen_params", "grads", "optimizer_state"), 0)
    out["frozen_grads"] = out["frozen_optimizer_state"] = 0
    for p in module.parameters():
        frozen = not p.requires_grad
        out["frozen_params" if frozen else "trainable_params"] += _local_bytes(p)
        if grads and p.grad is not None:
            out["frozen_grads" if frozen else "grads"] += _local_bytes(p.grad)
        state = optimizer.state.get(p, {})
        held = sum(_local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
        out["frozen_optimizer_state" if frozen else "optimizer_state"] += held
    return out


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int | None:
    """Return freed heap to the system and reset this process's peak-RSS mark to its current RSS
    (Linux ≥ 4.0); the RSS in bytes, or None where the mark cannot be reset."""
    import ctypes
    import ctypes.util

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # glibc; a no-op elsewhere
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _peak_rss(reset: bool) -> int:
    import resource
    import sys

    peak = _status_bytes("VmHWM") if reset else None
    if peak is None:  # ru_maxrss: kB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


# ----------------------------------------------------------------------------- one Trainer run


def _callback(warmup: int) -> Any:
    import lightning as L

    from benchmarks.comm import _recording_mode

    class Probe(L.Callback):
        """Step end times; the collectives of the last warm-up step; the bytes held at the last step."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.mode: Any = None
            self.collectives: dict[str, Any] = {}
            self.grads: int = 0
            self.frozen_grads: int = 0
            self.held: dict[str, int] = {}

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == warmup - 1:  # untimed: the clock starts at this step's end
                self.mode = _recording_mode()
                self.mode.__enter__()

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            counted = held_bytes(pl_module, optimizer)
            self.grads, self.frozen_grads = counted["grads"], counted["frozen_grads"]

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                counts = {str(k).split(".")[-1]: v for k, v in self.mode.get_comm_counts().items()}
                self.collectives = {"counts": dict(sorted(counts.items())),
                                    "elements": _ring_elements(self.mode.records)}
                self.mode = None
            self.ends.append(time.perf_counter())
            self.held = {**held_bytes(pl_module, trainer.optimizers[0], grads=False), "grads": self.grads,
                         "frozen_grads": self.frozen_grads}

    return Probe()


def _ring_elements(records: list[tuple[str, int, int]]) -> dict[str, float]:
    """Elements each rank sends per collective kind (:func:`benchmarks.comm.ring_elements`)."""
    from benchmarks.comm import ring_elements

    out: dict[str, float] = {}
    for op, n, group in records:
        out[op] = out.get(op, 0.0) + ring_elements(op, n, group)
    return out


def _fit(config: Any, lora: bool, batch: int, seq: int, steps: int, warmup: int, lora_rank: int,
         lora_dropout: float) -> dict[str, Any]:
    """One Trainer run on the launched ranks (dp=1 × tp=world): tokens/s, held bytes, peak RSS, collectives."""
    import lightning as L
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_tp import TensorParallelStrategy

    class BenchLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build(config, lora, lora_rank, lora_dropout)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            tokens = batch[0]
            logits = self.model(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)  # frozen ones included, as users write it

    dist.barrier()  # both ranks reset their marks before either allocates
    start_rss = _reset_peak_rss()
    world = dist.get_world_size()
    tokens = torch.randint(0, config.vocab_size, ((warmup + steps) * batch, seq + 1),
                           generator=torch.Generator().manual_seed(0))
    probe = _callback(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=world, max_steps=warmup + steps, precision="32-true",
                        strategy=TensorParallelStrategy(data_parallel_size=1, tensor_parallel_size=world),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    trainer.fit(BenchLM(), DataLoader(TensorDataset(tokens), batch_size=batch))
    peak = _peak_rss(start_rss is not None)
    return {"tokens_per_s": batch * seq * steps / (probe.ends[-1] - probe.ends[warmup - 1]),
            "held": probe.held, "collectives_per_step": probe.collectives, "peak_rss": peak,
            "rss_added": peak - start_rss if start_rss is not None else None}


# ----------------------------------------------------------------------------- collectives per layer


def _per_layer(preset: str, lora_rank: int, lora_dropout: float | None, batch: int, seq: int,
               mesh: Any) -> dict[str, Any]:
    """Collectives per decoder layer of one training step and the bytes forward saves for backward per layer,
    parallelized as the strategy does it (TP with SP and loss parallel, then FSDP2 on the ``(1, tp)`` mesh): a
    2-layer model minus a 1-layer one. ``lora_dropout=None``: no adapters."""
    import dataclasses

    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel

    from benchmarks.comm import _recording_mode
    from lightning_tp.config import ParallelConfig
    from lightning_tp.parallel.parallelize import parallelize
    from lightning_tp.parallel.plans import resolve_plan

    tp = mesh["tensor_parallel"].size()
    parallel = dataclasses.replace(ParallelConfig(), tensor_parallel_size=tp, data_parallel_size=1)
    runs: dict[int, dict[str, Any]] = {}
    saved: dict[int, dict[int, int]] = {}
    for layers in (1, 2):
        config = bench_config(preset, num_hidden_layers=layers)
        model = build(config, lora_dropout is not None, lora_rank, lora_dropout or 0.0)
        plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
        parallelize(model, plan, parallel, mesh, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
        saved[layers] = {}

        def pack(x: torch.Tensor, model: Any = model, into: dict[int, int] = saved[layers]) -> torch.Tensor:
            # FSDP2 swaps in unsharded parameters for the forward: the set is taken when a tensor is saved
            params = {_storage(p).data_ptr() for p in model.parameters()}
            storage = _storage(x)
            if storage.data_ptr() not in params:
                into[storage.data_ptr()] = storage.nbytes()
            return x

        runs[layers] = {}
        for phase in PHASES:
            mode = _recording_mode()
            with mode, loss_parallel():
                if phase == "forward":
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                        logits = model(tokens[:, :-1])
                        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
                elif phase == "backward":
                    loss.backward()
                else:
                    optimizer.step()
            runs[layers][phase] = ({str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()},
                                   _ring_elements(mode.records))
    per_layer: dict[str, Any] = {"elements": {},
                                 "saved_bytes": sum(saved[2].values()) - sum(saved[1].values())}
    for phase in PHASES:
        (c1, e1), (c2, e2) = runs[1][phase], runs[2][phase]
        per_layer[phase] = _difference(c2, c1)
        for op, n in _difference(e2, e1).items():
            per_layer["elements"][op] = per_layer["elements"].get(op, 0) + n
    return per_layer


def _storage(t: Any) -> Any:
    return getattr(t, "_local_tensor", t).untyped_storage()  # a DTensor's local shard


def _difference(two: dict[str, Any], one: dict[str, Any]) -> dict[str, Any]:
    """Per op, ``two − one``, the ops that do not change left out."""
    return {op: two.get(op, 0) - one.get(op, 0) for op in sorted(set(one) | set(two))
            if two.get(op, 0) != one.get(op, 0)}


# ----------------------------------------------------------------------------- the benchmark


def measure(preset: str, batch: int, seq: int, steps: int, warmup: int, pairs: int, warmup_runs: int = 1,
            lora_rank: int = 16, lora_dropout: float = 0.05,
            variants: tuple[str, ...] | list[str] = VARIANTS) -> dict[str, Any]:
    """Collectives and saved bytes per layer of each variant; ``warmup_runs`` discarded runs of each variant (the
    process's one-off imports and caches would otherwise count in the first run's memory); then paired Trainer
    runs of the ``variants`` (:data:`VARIANTS`; ``lora`` and ``full`` always), the order reversed every other
    pair; ratios are taken against ``full``; memory from every rank."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if warmup < 1:
        raise ValueError(f"warmup={warmup}: at least one untimed step is needed to start the clock")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not {"lora", "full"} <= set(variants):
        raise ValueError(f"variants={list(variants)}: each of {list(VARIANTS)}, 'lora' and 'full' included")
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise BenchmarkError('the LoRA benchmark needs PEFT: pip install "lightning-tp[lora]"') from e
    variants = tuple(variants)
    dropout = {"lora": lora_dropout, "full": None, "lora_no_dropout": 0.0}  # None: no adapters
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data_parallel", "tensor_parallel"))
    per_layer = {v: _per_layer(preset, lora_rank, dropout[v], batch, seq, mesh) for v in variants}
    config = bench_config(preset)

    def fit(variant: str, timed: int) -> dict[str, Any]:
        p = dropout[variant]
        return _fit(config, p is not None, batch, seq, timed, warmup, lora_rank, p or 0.0)

    for _ in range(warmup_runs):
        for variant in variants:
            fit(variant, 1)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(pairs):
        for variant in (variants if i % 2 == 0 else variants[::-1]):
            runs[variant].append(fit(variant, steps))
    memory = {v: [{"held": r["held"], "peak_rss": r["peak_rss"], "rss_added": r["rss_added"]} for r in runs[v]]
              for v in variants}
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, memory)
    tps = {v: [r["tokens_per_s"] for r in runs[v]] for v in variants}
    out = {**tps, **paired_summary(tps["lora"], tps["full"]), "variants": list(variants), "memory_per_rank": ranks,
           "per_layer": per_layer,
           "collectives_per_step": {v: runs[v][-1]["collectives_per_step"] for v in variants},
           "peak_rss_is_per_run": runs["lora"][0]["rss_added"] is not None,
           "preset": preset, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
           "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
           "kv_heads": config.num_key_value_heads, "head_dim": config.resolved_head_dim,
           "vocab": config.vocab_size, "lora_rank": lora_rank, "lora_dropout": lora_dropout,
           "targets": list(TARGETS), "tp": world, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
           "warmup_runs": warmup_runs, "threads_per_rank": torch.get_num_threads()}
    if "lora_no_dropout" in tps:
        out["no_dropout_vs_full"] = paired_summary(tps["lora_no_dropout"], tps["full"])
    return out


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f}"


def report(r: dict[str, Any]) -> str:
    import statistics

    from benchmarks.comm import _fmt_counts

    variants = r["variants"]
    extra = "lora_no_dropout" in variants
    headers = ["LoRA tokens/s", "full tokens/s", "LoRA / full"]
    if extra:
        headers += ["LoRA, dropout 0, tokens/s", "LoRA dropout 0 / full"]
    rows = []
    for i, (a, b) in enumerate(zip(r["lora"], r["full"], strict=True)):
        rows.append([f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.3f}"])
        if extra:
            rows[-1] += [f"{r['lora_no_dropout'][i]:,.0f}", f"{r['lora_no_dropout'][i] / b:.3f}"]
    lines = [
        f"## LoRA vs full fine-tuning (dp=1 × tp={r['tp']}, SP + loss parallel + FSDP2,"
        f" {r['threads_per_rank']} thread per rank, model '{r['preset']}' h={r['hidden']} L={r['layers']},"
        f" LoRA r={r['lora_rank']} dropout {r['lora_dropout']} on {len(r['targets'])} projections, b={r['batch']},"
        f" s={r['seq']}, {r['steps']} timed steps after {r['warmup']} warm-up, fp32)", "",
        table(headers, rows), "",
        f"median LoRA {r['median_a']:,.0f} tokens/s, median full {r['median_b']:,.0f} tokens/s, median of"
        f" per-pair ratios LoRA/full = {r['median_ratio']:.3f} (range {r['min_ratio']:.3f}–{r['max_ratio']:.3f},"
        f" {r['pairs']} pairs)",
    ]
    if extra:
        n = r["no_dropout_vs_full"]
        lines.append(f"LoRA with lora_dropout=0 (no dropout of the input in front of each adapter): median"
                     f" {n['median_a']:,.0f} tokens/s, median of per-pair ratios LoRA-dropout-0/full ="
                     f" {n['median_ratio']:.3f} (range {n['min_ratio']:.3f}–{n['max_ratio']:.3f})")
    body = []
    for rank, memory in enumerate(r["memory_per_rank"]):
        for v in variants:
            held = memory[v][-1]["held"]
            added = [m["rss_added"] for m in memory[v] if m["rss_added"] is not None]
            body.append([rank, v, _mib(held["trainable_params"]), _mib(held["frozen_params"]),
                         _mib(held["grads"]), _mib(held["optimizer_state"]), _mib(sum(held.values())),
                         _mib(statistics.median(m["peak_rss"] for m in memory[v])),
                         _mib(statistics.median(added)) if added else "n/a"])
    peak = "peak RSS (median)" if r["peak_rss_is_per_run"] else "process ru_maxrss (cumulative)"
    lines += ["", table(["rank", "variant", "trainable params", "frozen params", "grads", "optimizer state",
                         "held", peak, "RSS added by the run (median)"], body),
              "", "MiB per rank; held = parameters + gradients + optimizer state counted from the tensors (local"
              " shards) at the last step."]
    held = {v: r["memory_per_rank"][0][v][-1]["held"] for v in ("lora", "full")}
    trained = {v: held[v]["trainable_params"] + held[v]["grads"] + held[v]["optimizer_state"] for v in held}
    lines.append(f"Rank 0: LoRA's trainable params + grads + optimizer state are"
                 f" {trained['lora'] / trained['full']:.2%} of full fine-tuning's; everything held"
                 f" {sum(held['lora'].values()) / sum(held['full'].values()):.2%}.")
    layer, step = r["per_layer"], r["collectives_per_step"]
    lines += ["", f"### Per decoder layer (2-layer minus 1-layer model, parallelized as the strategy does) and per"
              f" whole step (the Trainer's last warm-up step, {r['layers']} layers)", "",
              table(["variant", "forward / layer", "backward / layer", "optimizer / layer",
                     "elements sent / layer", "saved for backward / layer, MiB", "whole step"],
                    [[v, _fmt_counts(layer[v]["forward"]), _fmt_counts(layer[v]["backward"]),
                      _fmt_counts(layer[v]["optimizer"]),
                      " + ".join(f"{int(round(n)):,} {SHORT[op]}" for op, n in sorted(layer[v]["elements"].items())),
                      _mib(layer[v]["saved_bytes"]), _fmt_counts(step[v].get("counts", {}))] for v in variants])]
    activations = {v: {p: {op: n for op, n in layer[v][p].items() if op != "all_reduce"} for p in PHASES}
                   for v in ("lora", "full")}
    reduced = {v: layer[v]["backward"].get("all_reduce", 0) for v in ("lora", "full")}
    lines.append(f"\nactivation collectives (all-gather, reduce-scatter) per layer with LoRA"
                 f" {'equal' if activations['lora'] == activations['full'] else 'DIFFER from'} those without;"
                 f" gradient all-reduces per layer: LoRA {reduced['lora']} (the replicated adapter factors),"
                 f" full {reduced['full']} (the replicated norm weights)")
    return "\n".join(lines)
