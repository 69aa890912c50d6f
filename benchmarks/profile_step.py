"""Where the time of one training step goes: ours (SP + loss parallel, and each flag alone) against the stock
``ModelParallelStrategy`` with the hand-written per-projection plan, side by side on 2 ranks × 1 thread.

    python -m benchmarks.profile_step [--steps 4] [--warmup 2] [--rounds 2] [--json OUT]

Each variant is the Trainer run of ``benchmarks.throughput`` (same model, data, optimizer). After ``warmup``
untimed steps, ``steps`` steps run under ``torch.profiler`` (CPU), and as many again without it (the step time
the table quotes; the profiler's own overhead is per op, so its wall time is not used). The profile is split
by the ops' self CPU time on the training thread:

* collectives: gloo / ``_c10d_functional`` ops and ``wait_tensor`` (time the training thread spends in them,
  including waiting for the other rank);
* DTensor dispatch: the profiler's ``PythonSubclass`` (DTensor's ``__torch_dispatch__``: sharding propagation,
  local op call), ``Redistribute`` and the ``to_local``/``from_local`` autograd functions, self time;
* FSDP2 hooks and ``Optimizer.step``: their Python self time;
* matmuls and attention (``mm``, ``addmm``, ``bmm``, SDPA);
* other aten ops (elementwise, copies, reductions, the optimizer's);
* outside any op: the profiled wall time minus the ops' self time, i.e. Python: DTensor's sharding
  propagation and redistribution planning, module hooks, autograd and Lightning bookkeeping.

Rounds alternate the order of the variants. Rank 0 prints the medians over rounds, the round with the shortest
profiled step per variant, each variant's top ops, and then the cost of single gloo collectives of the sizes the
step issues (:func:`collective_costs`) and of one norm under each norm style (:func:`norm_costs`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

VARIANTS = {  # name: (stock, sequence_parallel, loss_parallel)
    "stock": (True, False, False),
    "ours": (False, True, True),
    "ours_sp_only": (False, True, False),
    "ours_lp_only": (False, False, True),
    "ours_tp_only": (False, False, False),
}

_COLLECTIVE = ("c10d", "gloo", "all_gather", "reduce_scatter", "all_reduce", "allreduce", "wait_tensor",
               "broadcast", "_reduce_scatter")
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product", "aten::scaled_dot_product",
           "aten::_flash_attention", "aten::baddbmm")


_DTENSOR = ("PythonSubclass", "Redistribute", "NestedRedistribute", "_FromTorchTensor", "_ToTorchTensor",
            "_FromTorchTensorBackward", "_ToTorchTensorBackward")


def _category(name: str) -> str:
    low = name.lower()
    if name in _DTENSOR:
        return "DTensor dispatch"
    if name.startswith("FSDP::") or name.startswith("Optimizer."):
        return "FSDP2 + optimizer (Python)"
    if any(k in low for k in _COLLECTIVE):
        return "collectives"
    if any(name.startswith(k) for k in _MATMUL):
        return "matmul + attention"
    return "other ops"


class _Calls:
    """Counts ``__torch_function__`` calls seen by the strategy's loss-parallel mode (patched in below)."""

    count = 0


def _counting_mode() -> None:
    from lightning_tp.strategy import loss_parallel, strategy

    base = loss_parallel.VocabParallelCrossEntropy

    class Counting(base):  # type: ignore[misc, valid-type]
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
            _Calls.count += 1
            return super().__torch_function__(func, types, args, kwargs)

    strategy.VocabParallelCrossEntropy = Counting


def _run(config: Any, name: str, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    import lightning as L
    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.throughput import _lightning_module
    from lightning_tp import TensorParallelStrategy

    stock, sp, lp = VARIANTS[name]
    world = dist.get_world_size()
    strategy = (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world) if stock else
                TensorParallelStrategy(data_parallel_size=1, tensor_parallel_size=world,
                                       sequence_parallel=sp, loss_parallel=lp))
    total = warmup + 2 * steps
    tokens = torch.randint(0, config.vocab_size, (total * batch, seq + 1),
                           generator=torch.Generator().manual_seed(0))

    class Probe(L.Callback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.marks: dict[str, float] = {}
            self.calls = 0

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
            if i == warmup:
                dist.barrier()
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
                self.marks["prof"] = time.perf_counter()
                _Calls.count = 0
            if i == warmup + steps:
                dist.barrier()
                self.marks["plain"] = time.perf_counter()
                self.calls = _Calls.count

        def on_train_batch_end(self, trainer: Any, module: Any, out: Any, batch: Any, i: int) -> None:
            if i == warmup + steps - 1:
                self.marks["prof_end"] = time.perf_counter()
                self.prof.__exit__(None, None, None)
            if i == total - 1:
                self.marks["plain_end"] = time.perf_counter()

    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=total, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    trainer.fit(_lightning_module(config, stock), DataLoader(TensorDataset(tokens), batch_size=batch))

    events = [e for e in probe.prof.events() if e.device_type.name == "CPU"]
    per_thread: Counter[int] = Counter()
    for e in events:
        if e.name.startswith("aten::mm") or e.name.startswith("aten::addmm"):
            per_thread[e.thread] += 1
    main = per_thread.most_common(1)[0][0]
    by_cat: Counter[str] = Counter()
    by_op: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for e in events:
        if e.thread != main:
            continue
        by_cat[_category(e.name)] += e.self_cpu_time_total
        by_op[e.name] += e.self_cpu_time_total
        counts[e.name] += 1
    prof_ms = (probe.marks["prof_end"] - probe.marks["prof"]) * 1e3 / steps
    ops_ms = sum(by_cat.values()) / 1e3 / steps
    ms = {k: v / 1e3 / steps for k, v in by_cat.items()}
    ms["outside any op"] = prof_ms - ops_ms
    return {
        "step_ms": (probe.marks["plain_end"] - probe.marks["plain"]) * 1e3 / steps,
        "profiled_step_ms": prof_ms,
        "categories_ms": ms,
        "ops_ms": {k: v / 1e3 / steps for k, v in by_op.most_common(40)},
        "op_calls": {k: counts[k] / steps for k, _ in by_op.most_common(40)},
        "ops_per_step": sum(counts.values()) / steps,
        "collectives_per_step": {k: v / steps for k, v in counts.items() if _category(k) == "collectives"},
        "torch_function_calls_per_step": probe.calls / steps if not stock and lp else 0,
    }


def measure(preset: str, batch: int, seq: int, steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    from benchmarks._common import bench_config

    _counting_mode()
    config = bench_config(preset)
    names = list(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(_run(config, name, batch, seq, steps, warmup))
    return {"runs": runs, "preset": preset, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
            "rounds": rounds}


def _median(runs: list[dict[str, Any]], *keys: str) -> float:
    values = []
    for r in runs:
        v: Any = r
        for k in keys:
            v = v.get(k, 0.0) if isinstance(v, dict) else 0.0
        values.append(float(v))
    return statistics.median(values)


def report(res: dict[str, Any]) -> str:
    from benchmarks._common import table

    runs = res["runs"]
    cats = ["collectives", "DTensor dispatch", "FSDP2 + optimizer (Python)", "matmul + attention", "other ops",
            "outside any op"]
    headers = ["variant", "step ms (no profiler)", "profiled step ms"] + [f"{c} ms" for c in cats] + [
        "ops/step", "torch-function calls/step"]
    rows = []
    for name, rs in runs.items():
        rows.append([name, _median(rs, "step_ms"), _median(rs, "profiled_step_ms")]
                    + [_median(rs, "categories_ms", c) for c in cats]
                    + [_median(rs, "ops_per_step"), _median(rs, "torch_function_calls_per_step")])
    best = []  # on a shared machine the least disturbed round shows the structure best
    for name, rs in runs.items():
        r = min(rs, key=lambda x: x["profiled_step_ms"])
        best.append([name, r["step_ms"], r["profiled_step_ms"]] + [r["categories_ms"].get(c, 0.0) for c in cats]
                    + [r["ops_per_step"], r["torch_function_calls_per_step"]])
    lines = [f"## One training step, by where its time goes (rank 0, '{res['preset']}', b={res['batch']},"
             f" s={res['seq']}, medians of {res['rounds']} rounds of {res['steps']} steps)", "",
             table(headers, rows), "",
             "### the round with the shortest profiled step, per variant", "", table(headers, best), ""]
    if "collective_ms" in res:
        lines += ["### gloo, one collective + wait_tensor (median ms of 40, 2 ranks)", "",
                  table(["collective", "ms"], list(res["collective_ms"].items())), ""]
    if "norm_ms" in res:
        lines += ["### one RMSNorm forward + backward on the sequence shard (median ms of 60, rank 0)", "",
                  table(["norm", "ms"], list(res["norm_ms"].items())), ""]
    for name, rs in runs.items():
        ops = rs[0]["ops_ms"]
        calls = rs[0]["op_calls"]
        top = sorted(ops, key=ops.get, reverse=True)[:15]
        lines += [f"### {name}: top ops by self ms/step (round 1)", "",
                  table(["op", "ms/step", "calls/step"], [[k, ops[k], calls[k]] for k in top]), ""]
        coll = rs[0]["collectives_per_step"]
        lines.append("collective ops per step: " + ", ".join(f"{k} {v:g}" for k, v in sorted(coll.items())))
        lines.append("")
    return "\n".join(lines)


def collective_costs(batch: int, seq: int, hidden: int, repeats: int = 40) -> dict[str, float]:
    """Median ms of one functional collective + ``wait_tensor`` on the launched ranks, after a barrier: an
    all-reduce of ``b·s·h`` floats (TP's), the all-gather to and the reduce-scatter from that size (SP's), an
    all-reduce of ``h`` floats (one norm weight's gradient) and of 9·h (the 4-layer model's 9 norms at once)."""
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    group, world = dist.group.WORLD, dist.get_world_size()
    n = batch * seq * hidden
    full, shard = torch.randn(n), torch.randn(n // world)
    norm, norms = torch.randn(hidden), torch.randn(9 * hidden)
    cases = {
        "all-reduce b·s·h": lambda: fc.all_reduce(full, "sum", group),
        "all-gather to b·s·h": lambda: fc.all_gather_tensor(shard, 0, group),
        "reduce-scatter from b·s·h": lambda: fc.reduce_scatter_tensor(full, "sum", 0, group),
        "all-reduce h (one norm gradient)": lambda: fc.all_reduce(norm, "sum", group),
        "all-reduce 9·h (9 norm gradients at once)": lambda: fc.all_reduce(norms, "sum", group),
    }
    out = {}
    for name, call in cases.items():
        times = []
        for i in range(repeats + 5):
            dist.barrier()
            start = time.perf_counter()
            fc.wait_tensor(call())
            if i >= 5:
                times.append((time.perf_counter() - start) * 1e3)
        out[name] = statistics.median(times)
    return out


def norm_costs(batch: int, seq: int, hidden: int, repeats: int = 60) -> dict[str, float]:
    """Median ms of one forward + backward of the native RMSNorm on this rank's sequence shard
    ``(b, s/tp, h)``: under torch's ``SequenceParallel`` (DTensor dispatch per op), under
    ``SequenceParallelNorm`` (the same ops on local tensors, the weight's gradient a ``Partial`` DTensor) and
    as a plain module (no DTensor at all: the floor). The three alternate within each repeat."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    from lightning_tp.models.llama import RMSNorm
    from lightning_tp.parallel.styles import SequenceParallelNorm

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    x, grad = torch.randn(batch, seq // world, hidden), torch.randn(batch, seq // world, hidden)
    cases = {"SequenceParallel (DTensor ops)": SequenceParallel(use_local_output=True),
             "SequenceParallelNorm (local ops)": SequenceParallelNorm(use_local_output=True),
             "plain RMSNorm (no DTensor)": None}
    modules = {}
    for name, style in cases.items():
        module = RMSNorm(hidden)
        module.reset_parameters()
        modules[name] = module if style is None else parallelize_module(module, mesh, style)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(repeats + 5):
        for name, module in modules.items():
            inp = x.clone().requires_grad_()
            start = time.perf_counter()
            module(inp).backward(grad)
            if i >= 5:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _worker(spec: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    from benchmarks._common import bench_config

    dist.init_process_group("gloo")
    res = measure(**spec)
    hidden = bench_config(spec["preset"]).hidden_size
    res["collective_ms"] = collective_costs(spec["batch"], spec["seq"], hidden)
    res["norm_ms"] = norm_costs(spec["batch"], spec["seq"], hidden)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import subprocess
    import tempfile
    from pathlib import Path

    from benchmarks._common import REPO, _free_port, machine

    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="throughput")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    spec = {k: getattr(args, k) for k in ("preset", "batch", "seq", "steps", "warmup", "rounds")}
    print(f"Machine: {machine()}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="lightning_tp_profile_") as tmp:
        out = str(Path(tmp) / "out.json")
        port = str(_free_port())
        procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.profile_step", "--worker",
                                           json.dumps(spec), out], cwd=REPO, env=env))
        rcs = [proc.wait() for proc in procs]
        if any(rcs):
            print(f"a rank failed: exit codes {rcs}", file=sys.stderr)
            return 1
        res = json.loads(Path(out).read_text())
    print(report(res))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
