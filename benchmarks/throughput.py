"""Training throughput: our strategy against Lightning's stock ``ModelParallelStrategy``, TP efficiency on
CPU, and single-device tokens/s + MFU on a GPU.

    python -m benchmarks throughput [--quick]   # ours vs stock, dp=1 × tp=2, 2 ranks × 1 thread
    python -m benchmarks efficiency [--quick]   # tp=2 (2 ranks × 1 thread) over tp=1 (1 process × 2 threads)
    python -m benchmarks gpu [--preset llama3_1b] [--no-compile] [--activation-checkpointing selective]

Noise control: runs are paired and alternate their order (A B, B A, A B, ...); each run's first
``warmup`` optimizer steps are not timed; the report gives the median tokens/s of each side and the
median of the per-pair ratios.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks._common import bench_config, paired_summary, table

# ----------------------------------------------------------------------------- ours vs stock (Lightning)


def _lightning_module(config: Any, stock: bool) -> Any:
    import lightning as L
    import torch
    import torch.nn.functional as F

    from lightning_tp.models import Llama

    class BenchLM(L.LightningModule):
        """A user's module: a Llama built in ``__init__`` and ``F.cross_entropy``. ``stock`` adds what Lightning's
        ``ModelParallelStrategy`` asks the user to write in ``configure_model``."""

        def __init__(self) -> None:
            super().__init__()
            self.model = Llama(config)
            self.model.init_weights(seed=0)

        def configure_model(self) -> None:
            if stock:
                _hand_written_per_projection(self.model, self.device_mesh)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            tokens = batch[0]
            logits = self.model(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # foreach=False on both sides: the stock layout mixes a 2D mesh (TP+FSDP) and a 1D mesh (norms,
            # FSDP only), which the multi-tensor kernels reject.
            return torch.optim.AdamW(self.parameters(), lr=1e-4, foreach=False)

    return BenchLM()


def _hand_written_per_projection(model: Any, device_mesh: Any) -> None:
    """What Lightning's tensor-parallel docs have the user write: each projection sharded on its own, full
    logits gathered, no sequence or loss parallelism, then FSDP2 per block and on the model."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh, dp_mesh = device_mesh["tensor_parallel"], device_mesh["data_parallel"]
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        })
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def _step_timer(warmup: int) -> Any:
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

        def seconds(self) -> float:
            return self.ends[-1] - self.ends[warmup - 1]

    return StepTimer()


def _fit(config: Any, variant: str, batch: int, seq: int, steps: int, warmup: int) -> float:
    """Tokens/s of one Trainer run on the launched ranks (dp=1 × tp=world).

    ``variant``: ``"ours"`` (defaults: SP + loss parallel), ``"ours_tp_only"`` (``sequence_parallel=False,
    loss_parallel=False``, the same flags as the stock run: isolates the plan) or ``"stock"``.
    """
    import lightning as L
    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_tp import TensorParallelStrategy

    world = dist.get_world_size()
    stock = variant == "stock"
    if stock:
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world)
    else:
        only = variant == "ours_tp_only"
        strategy = TensorParallelStrategy(data_parallel_size=1, tensor_parallel_size=world,
                                          sequence_parallel=not only, loss_parallel=not only)
    tokens = torch.randint(0, config.vocab_size, ((warmup + steps) * batch, seq + 1),
                           generator=torch.Generator().manual_seed(0))
    timer = _step_timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=warmup + steps,
                        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(_lightning_module(config, stock), DataLoader(TensorDataset(tokens), batch_size=batch))
    return batch * seq * steps / timer.seconds()


def measure_vs_stock(preset: str, batch: int, seq: int, steps: int, warmup: int, pairs: int,
                     variants: tuple[str, ...] = ("ours", "stock", "ours_tp_only")) -> dict[str, Any]:
    """Paired runs of each variant (order reversed every other round); ratios are taken against ``stock``."""
    import torch

    if warmup < 1:
        raise ValueError(f"warmup={warmup}: at least one untimed step is needed to start the clock")
    config = bench_config(preset)
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(pairs):
        for variant in (variants if i % 2 == 0 else variants[::-1]):
            runs[variant].append(_fit(config, variant, batch, seq, steps, warmup))
    out: dict[str, Any] = {**runs, **paired_summary(runs["ours"], runs["stock"]), "preset": preset, "batch": batch,
                           "seq": seq, "steps": steps, "warmup": warmup, "threads_per_rank": torch.get_num_threads()}
    if "ours_tp_only" in runs:
        out["tp_only_vs_stock"] = paired_summary(runs["ours_tp_only"], runs["stock"])
    return out


def report_vs_stock(r: dict[str, Any]) -> str:
    extra = "ours_tp_only" in r
    headers = ["ours tokens/s", "stock tokens/s", "ours / stock"]
    if extra:
        headers += ["ours TP-only tokens/s", "ours TP-only / stock"]
    rows = []
    for i, (a, b) in enumerate(zip(r["ours"], r["stock"], strict=True)):
        row = [f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.3f}"]
        if extra:
            row += [f"{r['ours_tp_only'][i]:,.0f}", f"{r['ours_tp_only'][i] / b:.3f}"]
        rows.append(row)
    lines = [
        f"## CPU tokens/s: TensorParallelStrategy vs ModelParallelStrategy + hand-written per-projection plan"
        f" (dp=1 × tp=2, {r['threads_per_rank']} thread per rank, model '{r['preset']}', b={r['batch']},"
        f" s={r['seq']}, {r['steps']} timed steps after {r['warmup']} warm-up, fp32)", "",
        table(headers, rows), "",
        f"median ours {r['median_a']:,.0f} tokens/s, median stock {r['median_b']:,.0f} tokens/s,"
        f" median of per-pair ratios ours/stock = {r['median_ratio']:.3f}"
        f" (range {r['min_ratio']:.3f}–{r['max_ratio']:.3f}, {r['pairs']} pairs)",
    ]
    if extra:
        t = r["tp_only_vs_stock"]
        lines.append(f"ours with sequence_parallel=False, loss_parallel=False (the stock run's flags, our plan):"
                     f" median {t['median_a']:,.0f} tokens/s, median of per-pair ratios ours-TP-only/stock ="
                     f" {t['median_ratio']:.3f} (range {t['min_ratio']:.3f}–{t['max_ratio']:.3f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- TP efficiency


def _manual_run(config: Any, mesh: Any, batch: int, seq: int, steps: int, warmup: int) -> float:
    """Tokens/s of a plain training loop (forward, loss, backward, AdamW), TP-sharded when ``mesh`` is given."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.models import Llama
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    model = Llama(config)
    model.init_weights(seed=0)
    if mesh is not None:
        apply_tensor_parallel(model, resolve_plan(model, "llama", sequence_parallel=True, loss_parallel=True), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, config.vocab_size, (warmup + steps, batch, seq + 1),
                         generator=torch.Generator().manual_seed(0))
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        tokens = data[step]
        # the vocab-parallel loss and its backward run under the same context
        with loss_parallel() if mesh is not None else contextlib.nullcontext():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * seq * steps / (time.perf_counter() - start)


def measure_efficiency(preset: str, batch: int, seq: int, steps: int, warmup: int, pairs: int) -> dict[str, Any]:
    """tp=2 on the 2 launched ranks (1 thread each) against tp=1 on rank 0 alone with 2 threads."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if world != 2:
        raise ValueError(f"the efficiency benchmark needs exactly 2 ranks, got {world}")
    config = bench_config(preset)
    mesh = init_device_mesh("cpu", (2,))
    runs: dict[str, list[float]] = {"tp2": [], "tp1": [], "tp1_1thread": []}
    idle_cpu = []
    for i in range(pairs):
        order = ("tp2", "tp1", "tp1_1thread") if i % 2 == 0 else ("tp1_1thread", "tp1", "tp2")
        for kind in order:
            dist.barrier()
            if kind == "tp2":
                torch.set_num_threads(1)
                runs[kind].append(_manual_run(config, mesh, batch, seq, steps, warmup))
                continue
            if rank == 0:
                torch.set_num_threads(2 if kind == "tp1" else 1)
                runs[kind].append(_manual_run(config, None, batch, seq, steps, warmup))
                torch.set_num_threads(1)
                dist.barrier()
            else:
                # rank 1 waits; its CPU time while waiting shows whether it leaves both cores to rank 0
                cpu, wall = time.process_time(), time.perf_counter()
                dist.barrier()
                idle_cpu.append((time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9))
    idle: list[Any] = [None, None]
    dist.all_gather_object(idle, idle_cpu)
    out: dict[str, Any] = {**runs, "preset": preset, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
                           "waiting_rank_cpu_fraction": max(idle[1]) if idle[1] else None,
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
    if rank == 0:
        out.update(paired_summary(runs["tp2"], runs["tp1"]))
        out["vs_one_thread"] = paired_summary(runs["tp2"], runs["tp1_1thread"])
    return out


def report_efficiency(r: dict[str, Any]) -> str:
    rows = [[f"{a:,.0f}", f"{b:,.0f}", f"{c:,.0f}", f"{a / b:.3f}", f"{a / c:.3f}"]
            for a, b, c in zip(r["tp2"], r["tp1"], r["tp1_1thread"], strict=True)]
    one = r["vs_one_thread"]
    idle = r.get("waiting_rank_cpu_fraction")
    return "\n".join([
        f"## TP efficiency on CPU: tp=2 (2 ranks × 1 thread, SP + loss parallel) over tp=1 (1 process × 2"
        f" threads); model '{r['preset']}', b={r['batch']}, s={r['seq']}, {r['steps']} timed steps, fp32,"
        f" plain training loop, OMP_WAIT_POLICY={r['omp_wait_policy']}", "",
        table(["tp=2 tokens/s", "tp=1, 2 threads", "tp=1, 1 thread", "tp2 / tp1(2 threads)",
               "tp2 / tp1(1 thread)"], rows), "",
        f"median tp=2 {r['median_a']:,.0f} tokens/s, median tp=1 (2 threads) {r['median_b']:,.0f} tokens/s:"
        f" TP efficiency (median of per-pair ratios) = {r['median_ratio']:.3f}"
        f" (range {r['min_ratio']:.3f}–{r['max_ratio']:.3f}, {r['pairs']} pairs);"
        f" against tp=1 on one thread (median {one['median_b']:,.0f} tokens/s) the median ratio is"
        f" {one['median_ratio']:.3f} (ideal 2)"
        + (f"; the idle rank used {idle:.2%} of a core while tp=1 ran" if idle is not None else ""),
    ])


# ----------------------------------------------------------------------------- single device (GPU)


def measure_single_device(device: str, preset: str, batch: int, seq: int, steps: int, warmup: int,
                          compile: bool = True, activation_checkpointing: str = "none") -> dict[str, Any]:
    """Tokens/s and MFU of one device: bf16 autocast, fp32 master weights, fused AdamW on CUDA, per-block compile."""
    import torch
    import torch.nn.functional as F

    from lightning_tp.models import Llama, get_config
    from lightning_tp.parallel.plans import resolve_plan
    from lightning_tp.training.callbacks import peak_flops_for

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible here; run on a GPU machine, or pass"
                           " --device cpu for a dry run of the same code path")
    if warmup < 1:
        raise ValueError(f"warmup={warmup}: at least one untimed step is needed (compilation happens there)")
    config = get_config(preset)
    dev = torch.device(device)
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=dev)
    model.init_weights(seed=0)
    plan = resolve_plan(model, "llama", sequence_parallel=False, loss_parallel=False)
    try:
        from lightning_tp.parallel import recompute
    except ImportError:
        recompute = None
    if activation_checkpointing != "none":
        if recompute is None:
            raise RuntimeError("activation checkpointing needs lightning_tp.parallel.recompute")
        recompute.apply_activation_checkpointing(model, plan, activation_checkpointing)
    if compile:
        if recompute is not None and hasattr(recompute, "compile_blocks"):
            recompute.compile_blocks(model, plan)
        else:
            for path in plan.blocks:
                block = model.get_submodule(path)
                block.forward = torch.compile(block.forward)
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else False)
    data = torch.randint(0, config.vocab_size, (batch, seq + 1), device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            start = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    tokens_per_s = batch * seq * steps / (time.perf_counter() - start)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_flops_for(name, "bf16-mixed") if dev.type == "cuda" else None
    flops = config.flops_per_token(seq)
    # `flops_per_token` leaves out the embedding matrix (a lookup). Tied, that matrix is also lm_head, whose matmul
    # (6·V·h a token, forward and backward) is real work; torchtitan's formula counts an untied output layer, so
    # this second figure is the one to hold against its MFUs (24% more FLOPs for llama3_1b at s = 2048).
    head = 6 * config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    return {"device": name, "preset": preset, "batch": batch, "seq": seq, "steps": steps, "compile": compile,
            "activation_checkpointing": activation_checkpointing, "tokens_per_s": tokens_per_s,
            "flops_per_token": flops, "peak_flops": peak, "mfu": tokens_per_s * flops / peak if peak else None,
            "tied_head_flops_per_token": head,
            "mfu_with_tied_head": tokens_per_s * (flops + head) / peak if peak else None,
            "max_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "final_loss": float(loss.detach())}


def report_single_device(r: dict[str, Any]) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak for this device)"
    head = r.get("mfu_with_tied_head")
    mfu_head = f"{head:.1%}" if head is not None and r.get("tied_head_flops_per_token") else "n/a"
    mem = f"{r['max_memory_gib']:.1f} GiB" if r["max_memory_gib"] is not None else "n/a"
    return "\n".join([
        f"## Single-device throughput: {r['device']}, '{r['preset']}', b={r['batch']}, s={r['seq']}, bf16 autocast,"
        f" compile={r['compile']}, activation checkpointing={r['activation_checkpointing']}", "",
        table(["tokens/s", "FLOPs/token", "MFU", "MFU with the tied lm_head", "peak memory", "loss"],
              [[f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_token']:.3e}", mfu, mfu_head, mem,
                f"{r['final_loss']:.3f}"]]),
    ])
