"""2D tensor parallelism (an ``r × c`` grid) against 1D (SP) on the same devices.

    python -m benchmarks grid [--quick] [--world 4|8] [--pairs N; 0: collectives only]

**Collectives per layer.** For each layout (1D ``tp = world``; the grids whose product is the world)
and each ``(b·s, h)`` point, a 1-layer and a 2-layer Llama run one forward (to the loss), one
backward and the reduction of the ``Partial`` weight gradients (what FSDP2 or the optimizer does with
them, per step) under a recording ``CommDebugMode`` (functional collectives and c10d calls such as
the norms' ``torch.distributed.all_reduce``); the difference is one layer, and 2 × the 1-layer run −
the 2-layer run is what runs once per step outside the layers. Each collective is labelled by its
mesh dim (``R`` = ``tp_row``, ``C`` = ``tp_col``, ``flat`` = the 1D / flattened ``tensor_parallel``
group) and priced with the ring convention of :func:`benchmarks.comm.ring_elements`;
:func:`expected_terms` is the docs/2d.md formula, the same keys, so each (phase, op, dim) is
compared call by call and element by element.

**Tokens/s.** ``Trainer`` runs of the ``small`` preset under ``TensorParallelStrategy`` with
``tensor_parallel_size=(2, 2)`` and ``4`` on 4 ranks × 1 thread, paired in alternating order; the
median of the per-pair ratios 2D/1D.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks._common import paired_summary, table
from benchmarks.comm import ring_elements

PHASES = ("forward", "backward", "grads")
SHORT = {"all_reduce": "AR", "all_gather_into_tensor": "AG", "reduce_scatter_tensor": "RS",
         "all_to_all_single": "A2A"}
NORM_TERMS = (("all_reduce", "C"), ("all_reduce", "R"), ("all_reduce", "flat"))
"""The tiny terms: norm statistics over C (``T/r`` per norm) and norm weight gradients (``h/c``)."""

# (b, s, h): b·s in {256, 1024}, h in {256, 512}
POINTS = ((1, 256, 256), (4, 256, 256), (1, 256, 512), (4, 256, 512))
QUICK_POINTS = ((1, 64, 256),)


def grids_for(world: int) -> list[tuple[int, int]]:
    """The non-trivial grids ``(r, c)`` of ``world`` devices (both factors > 1)."""
    return [(r, world // r) for r in range(2, world) if world % r == 0 and world // r > 1]


def model_config(hidden: int, vocab: int = 512, layers: int = 1) -> Any:
    """Llama shapes of a point: head_dim 32, 8 KV heads (divisible by every grid of 8 devices),
    query heads ``h/32`` (``h = 256``: MHA, ``k = h``; ``h = 512``: GQA, ``k = h/2``), SwiGLU width
    ``8/3·h`` rounded to a multiple of 64."""
    from lightning_tp.models import get_config

    heads = hidden // 32
    return get_config("debug", hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=min(8, heads),
                      intermediate_size=64 * round(8 * hidden / 3 / 64), vocab_size=vocab, num_hidden_layers=layers,
                      max_position_embeddings=1024)


def expected_terms(tokens: int, hidden: int, q_width: int, kv_width: int, intermediate: int,
                   r: int, c: int) -> dict[str, dict[tuple[str, str], tuple[int, float]]]:
    """docs/2d.md, per layer: ``{phase: {(op, dim): (calls, elements sent per device)}}``.

    ``c == 0`` means 1D SP over ``r`` devices (dim ``"flat"``). Ring convention: an all-gather
    producing N or a reduce-scatter consuming N sends ``N·(p−1)/p``, an all-reduce ``2·N·(p−1)/p``.
    Terms over a group of one device are left out.
    """
    ag, rs, ar = "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"
    out: dict[str, dict[tuple[str, str], tuple[int, float]]] = {p: {} for p in PHASES}
    if c == 0:
        t = r
        if t > 1:
            for phase in ("forward", "backward"):
                out[phase] = {(ag, "flat"): (2, 2 * tokens * hidden * (t - 1) / t),
                              (rs, "flat"): (2, 2 * tokens * hidden * (t - 1) / t)}
            out["grads"] = {(ar, "flat"): (2, 2 * 2 * hidden * (t - 1) / t)}
        return out
    fr, fc = (r - 1) / r, (c - 1) / c
    t_r = tokens / r
    rows = {ag: (2, 2 * tokens * hidden / c * fr), rs: (2, 2 * tokens * hidden / c * fr)}  # block in / out
    cols_rs = (5, t_r * (q_width + 2 * kv_width + 2 * intermediate) * fc)  # q, k, v, gate, up outputs
    cols_ag = (2, t_r * (q_width + intermediate) * fc)  # o_proj, down inputs
    norm = (2, 2 * 2 * t_r * fc)  # the two norms' sum of squares (forward), of g·x̂ (backward)
    fwd = {(ag, "R"): rows[ag], (rs, "R"): rows[rs], (rs, "C"): cols_rs, (ag, "C"): cols_ag, (ar, "C"): norm}
    # backward: every all-gather a reduce-scatter over the same group and vice versa
    bwd = {(rs, "R"): rows[ag], (ag, "R"): rows[rs], (ag, "C"): cols_rs, (rs, "C"): cols_ag, (ar, "C"): norm}
    size = {"R": r, "C": c}
    out["forward"] = {k: v for k, v in fwd.items() if size[k[1]] > 1}
    out["backward"] = {k: v for k, v in bwd.items() if size[k[1]] > 1}
    if r > 1:
        out["grads"] = {(ar, "R"): (2, 2 * 2 * hidden / c * fr)}  # the norm weights [h/c], partial over R
    return out


def brief_ratio(hidden: int, kv_width: int, intermediate: int, r: int, c: int) -> float:
    """docs/2d.md's 2D/1D ratio of the large terms: ``[4h(r−1) + (c−1)(2h+2k+3F)] / [4h(rc−1)]``."""
    return (4 * hidden * (r - 1) + (c - 1) * (2 * hidden + 2 * kv_width + 3 * intermediate)) / (
        4 * hidden * (r * c - 1))


def per_layer(runs: dict[int, dict[str, list[tuple[str, int, int, str]]]],
              weights: tuple[tuple[int, int], ...] = ((2, 1), (1, -1))) -> dict[str, dict[str, list[float]]]:
    """(2-layer run) − (1-layer run): ``{phase: {"op dim": [calls, elements]}}`` from records
    ``(op, input elements, group size, dim)``. ``weights`` ``((1, 2), (2, -1))`` gives the part outside
    the layers instead (2 × 1-layer − 2-layer: embedding, final norm, ``lm_head``, loss; per step)."""
    out: dict[str, dict[str, list[float]]] = {}
    for phase in PHASES:
        acc: dict[str, list[float]] = {}
        for layers, sign in weights:
            for op, numel, size, dim in runs[layers][phase]:
                cell = acc.setdefault(f"{op} {dim}", [0, 0.0])
                cell[0] += sign
                cell[1] += sign * _ring(op, numel, size)
        out[phase] = {k: v for k, v in sorted(acc.items()) if v[0] or abs(v[1]) > 1e-6}
    return out


def _ring(op: str, numel: int, size: int) -> float:
    if op.startswith("c10d."):
        return float("nan")  # no cost model: reported as an unexpected collective, never as equal
    if op == "all_to_all_single":
        return numel * (size - 1) / size
    return ring_elements(op, numel, size)


C10D = {"allreduce_": "all_reduce", "_allgather_base_": "all_gather_into_tensor",
        "allgather_into_tensor_coalesced_": "all_gather_into_tensor",
        "_reduce_scatter_base_": "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced_": "reduce_scatter_tensor",
        "alltoall_base_": "all_to_all_single"}
"""c10d (``torch.distributed.all_reduce`` and the like, in place) ops by their functional name; their input
is the second argument (after the output) for all but ``allreduce_`` (and the ops not listed: the first)."""


def _numel(x: Any) -> int:
    return sum(int(t.numel()) for t in x) if isinstance(x, (list, tuple)) else int(x.numel())


def _c10d_group(args: Any) -> Any:
    """The process group among a c10d op's arguments (boxed as a ``ScriptObject``; the reduce op is one too)."""
    import torch
    from torch._C._distributed_c10d import ProcessGroup

    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return ProcessGroup.unbox(a)
            except RuntimeError:
                continue
    raise ValueError(f"no process group among the arguments of a c10d collective: {[type(a) for a in args]}")


def _recording_mode(dims: dict[str, str]) -> Any:
    from torch.distributed.distributed_c10d import _resolve_process_group
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops

    c10d_packets = {getattr(op, "__name__", str(op)) for op in c10d_collective_ops}

    class DimRecordingMode(CommDebugMode):
        """Keeps (op, input elements, group size, mesh dim) of every collective: the functional ones
        (DTensor's redistributions) and the c10d ones (``torch.distributed.all_reduce``); a c10d op
        without a ring cost model is kept under its own name, so it shows as an unexpected term."""

        def __init__(self) -> None:
            super().__init__()
            self.records: list[tuple[str, int, int, str]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if out is NotImplemented:
                return out
            name = getattr(getattr(func, "_overloadpacket", None), "__name__", "")
            namespace = getattr(func, "namespace", "")
            if namespace == "_c10d_functional" and name in SHORT:
                pg = _resolve_process_group((kwargs or {}).get("group_name", args[-1]))
                self.records.append((name, int(args[0].numel()), pg.size(), dims.get(pg.group_name, "other")))
            elif namespace == "c10d" and name in c10d_packets:
                pg = _c10d_group(args)
                numel = _numel(args[1] if name in C10D and name != "allreduce_" else args[0])
                self.records.append((C10D.get(name, f"c10d.{name}"), numel, pg.size(),
                                     dims.get(pg.group_name, "other")))
            return out

    return DimRecordingMode()


def _layouts(world: int, grids: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """One mesh per layout, built as the strategy builds it; ``dims`` maps group names to R/C/flat."""
    from torch.distributed.device_mesh import init_device_mesh

    flat = init_device_mesh("cpu", (1, world), mesh_dim_names=("data_parallel", "tensor_parallel"))
    out = [{"layout": f"1D tp {world}", "grid": None, "tp_mesh": flat["tensor_parallel"], "grid_mesh": None,
            "dims": {flat["tensor_parallel"].get_group().group_name: "flat"}}]
    for r, c in grids:
        mesh = init_device_mesh("cpu", (1, r, c), mesh_dim_names=("data_parallel", "tp_row", "tp_col"))
        mesh["tp_row", "tp_col"]._flatten("tensor_parallel")
        dims = {mesh.get_group("tp_row").group_name: "R", mesh.get_group("tp_col").group_name: "C",
                mesh["tensor_parallel"].get_group().group_name: "flat"}
        out.append({"layout": f"2D {r}×{c}", "grid": (r, c), "tp_mesh": mesh["tensor_parallel"],
                    "grid_mesh": mesh["tp_row", "tp_col"], "dims": dims})
    return out


def _one_step(config: Any, layout: dict[str, Any], batch: int, seq: int) -> dict[str, list[tuple[str, int, int, str]]]:
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Partial
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.models import Llama
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan
    from lightning_tp.parallel.shapes import check_model_shapes

    model = Llama(config)
    model.init_weights(seed=0)
    grid = layout["grid"]
    if grid is None:
        plan = resolve_plan(model, "llama", sequence_parallel=True, loss_parallel=True)
        check_model_shapes(model, plan, layout["tp_mesh"].size())
    else:
        plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True, grid=grid)
    apply_tensor_parallel(model, plan, layout["tp_mesh"], grid_mesh=layout["grid_mesh"])
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    out: dict[str, list[tuple[str, int, int, str]]] = {}
    for phase in PHASES:
        mode = _recording_mode(layout["dims"])
        with mode, loss_parallel():
            if phase == "forward":
                logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            elif phase == "backward":
                loss.backward()
            else:  # the Partial gradients summed to their parameter's placements (FSDP2 / the optimizer)
                for p in model.parameters():
                    g = p.grad
                    if isinstance(g, DTensor) and any(isinstance(x, Partial) for x in g.placements):
                        p.grad = g.redistribute(placements=p.placements)
        out[phase] = mode.records
    return out


def measure_comm(points: list[list[int]] | None = None, quick: bool = False) -> dict[str, Any]:
    """Per-layer collectives and elements for 1D and every grid of the launched ranks at each point."""
    import torch.distributed as dist

    world = dist.get_world_size()
    grids = grids_for(world)
    if not grids:
        raise ValueError(f"{world} ranks have no 2D grid with both sides > 1 (launch 4 or 8)")
    points = [list(p) for p in (points or (QUICK_POINTS if quick else POINTS))]
    layouts = _layouts(world, grids)
    rows = []
    for b, s, h in points:
        shapes = model_config(h)
        head_dim = h // shapes.num_attention_heads
        q, k, f = h, shapes.num_key_value_heads * head_dim, shapes.intermediate_size
        for lay in layouts:
            runs = {n: _one_step(model_config(h, layers=n), lay, b, s) for n in (1, 2)}
            r, c = lay["grid"] or (world, 0)
            expected = expected_terms(b * s, h, q, k, f, r, c)
            rows.append({"layout": lay["layout"], "grid": lay["grid"], "tp": world, "batch": b, "seq": s,
                         "tokens": b * s, "hidden": h, "kv_width": k, "intermediate": f,
                         "per_layer": per_layer(runs), "per_step": per_layer(runs, ((1, 2), (2, -1))),
                         "expected": {p: {f"{op} {d}": list(v) for (op, d), v in e.items()}
                                      for p, e in expected.items()}})
    return {"rows": rows, "world": world}


def large_elements(terms: dict[str, dict[str, list[float]]]) -> float:
    """Elements of every term but the tiny norm all-reduces, all phases."""
    tiny = {f"{op} {d}" for op, d in NORM_TERMS}
    return sum(v[1] for phase in terms.values() for key, v in phase.items() if key not in tiny)


def tiny_elements(terms: dict[str, dict[str, list[float]]]) -> float:
    tiny = {f"{op} {d}" for op, d in NORM_TERMS}
    return sum(v[1] for phase in terms.values() for key, v in phase.items() if key in tiny)


def mismatches(row: dict[str, Any]) -> list[str]:
    """Every (phase, op dim) where the measured calls or elements differ from the formula."""
    out = []
    for phase in PHASES:
        got, want = row["per_layer"].get(phase, {}), row["expected"].get(phase, {})
        for key in sorted(set(got) | set(want)):
            g, w = got.get(key, [0, 0.0]), want.get(key, [0, 0.0])
            if g[0] != w[0] or abs(g[1] - w[1]) > 1e-6 * max(1.0, abs(w[1])):
                out.append(f"{row['layout']} b·s={row['tokens']} h={row['hidden']} {phase} {key}:"
                           f" measured {g[0]} calls / {g[1]:,.0f} elements, formula {w[0]} / {w[1]:,.0f}")
    return out


# ----------------------------------------------------------------------------- tokens/s


def _fit(config: Any, size: Any, batch: int, seq: int, steps: int, warmup: int) -> float:
    import lightning as L
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.throughput import _lightning_module, _step_timer
    from lightning_tp import TensorParallelStrategy

    strategy = TensorParallelStrategy(data_parallel_size=1, tensor_parallel_size=size)
    tokens = torch.randint(0, config.vocab_size, ((warmup + steps) * batch, seq + 1),
                           generator=torch.Generator().manual_seed(0))
    timer = _step_timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=dist.get_world_size(), strategy=strategy,
                        max_steps=warmup + steps, precision="32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(_lightning_module(config, stock=False), DataLoader(TensorDataset(tokens), batch_size=batch))
    return batch * seq * steps / timer.seconds()


def measure_speed(preset: str, batch: int, seq: int, steps: int, warmup: int, pairs: int) -> dict[str, Any]:
    """Paired Trainer runs, 2D ``(r, c)`` and 1D ``r·c`` on the launched ranks, order alternating."""
    import torch
    import torch.distributed as dist

    from benchmarks._common import bench_config

    world = dist.get_world_size()
    grid = grids_for(world)[0]
    config = bench_config(preset)
    runs: dict[str, list[float]] = {"2d": [], "1d": []}
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    for i in range(pairs):
        for side in (("2d", "1d") if i % 2 == 0 else ("1d", "2d")):
            runs[side].append(_fit(config, grid if side == "2d" else world, batch, seq, steps, warmup))
    load.append(os.getloadavg()[0])
    return {**runs, **paired_summary(runs["2d"], runs["1d"]), "grid": grid, "tp": world, "preset": preset,
            "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "load_average": load,
            "seconds": time.perf_counter() - start, "threads_per_rank": torch.get_num_threads()}


# ----------------------------------------------------------------------------- reports


def _counts(terms: dict[str, list[float]], skip_tiny: bool = False) -> str:
    tiny = {f"{op} {d}" for op, d in NORM_TERMS}
    parts = []
    for key, (calls, _) in terms.items():
        if skip_tiny and key in tiny:
            continue
        op, dim = key.split(" ")
        parts.append(f"{int(calls)} {SHORT.get(op, op)}_{dim}")
    return " + ".join(parts) or "0"


def report_comm(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [f"## 2D against 1D: collectives per decoder layer ({result['world']} ranks, fp32; elements sent per"
             " device, ring convention; R = tp_row, C = tp_col, flat = the 1D group)", ""]
    body = []
    for r in rows:
        got, want = r["per_layer"], r["expected"]
        big, big_f = large_elements(got), large_elements(want)
        tiny, tiny_f = tiny_elements(got), tiny_elements(want)
        body.append([r["layout"], r["tokens"], r["hidden"], _counts(got["forward"]), _counts(got["backward"]),
                     _counts(got.get("grads", {})), int(round(big)), int(round(big_f)), f"{big / big_f:.3f}",
                     int(round(tiny)), int(round(tiny_f)),
                     f"{tiny / tiny_f:.3f}" if tiny_f else "-"])
    lines.append(table(["layout", "b·s", "h", "forward", "backward", "grads", "elements (large)", "formula",
                        "ratio", "norm ARs", "formula", "ratio"], body))
    lines += ["", "2D / 1D elements per layer (large terms, fwd + bwd):", ""]
    by = {(r["layout"], r["tokens"], r["hidden"]): r for r in rows}
    ratio_rows = []
    for r in rows:
        if r["grid"] is None:
            continue
        one = by[(f"1D tp {r['tp']}", r["tokens"], r["hidden"])]
        measured = large_elements(r["per_layer"]) / large_elements(one["per_layer"])
        formula = brief_ratio(r["hidden"], r["kv_width"], r["intermediate"], *r["grid"])
        ratio_rows.append([r["layout"], r["tokens"], r["hidden"], r["kv_width"], r["intermediate"],
                           int(round(large_elements(r["per_layer"]))), int(round(large_elements(one["per_layer"]))),
                           f"{measured:.3f}", f"{formula:.3f}"])
    lines.append(table(["layout", "b·s", "h", "k", "F", "2D elements", "1D elements", "2D/1D measured",
                        "2D/1D formula"], ratio_rows))
    if all("per_step" in r for r in rows):
        lines += ["", "Outside the layers, per step (embedding, final norm, lm_head, loss; 2 × 1-layer − 2-layer):", ""]
        lines.append(table(["layout", "b·s", "h", "forward", "backward", "grads", "elements"],
                           [[r["layout"], r["tokens"], r["hidden"], _counts(r["per_step"]["forward"]),
                             _counts(r["per_step"]["backward"]), _counts(r["per_step"].get("grads", {})),
                             int(round(sum(v[1] for p in r["per_step"].values() for v in p.values())))]
                            for r in rows]))
    bad = [m for r in rows for m in mismatches(r)]
    lines += ["", "Every (phase, collective, mesh dim) equal to the formula: " + ("yes" if not bad else "NO")]
    lines += [f"  * {m}" for m in bad]
    return "\n".join(lines)


def report_speed(r: dict[str, Any]) -> str:
    rr, cc = r["grid"]
    pairs = [[f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.3f}"] for a, b in zip(r["2d"], r["1d"], strict=True)]
    return "\n".join([
        f"## CPU tokens/s: 2D {rr}×{cc} against 1D tp {r['tp']} ({r['tp']} ranks × {r['threads_per_rank']} thread,"
        f" preset '{r['preset']}', b={r['batch']}, s={r['seq']}, {r['steps']} timed steps after {r['warmup']},"
        f" fp32; load average {r['load_average'][0]:.1f} → {r['load_average'][1]:.1f}; {r['seconds']:.0f} s)", "",
        table([f"2D {rr}×{cc} tokens/s", f"1D tp {r['tp']} tokens/s", "2D / 1D"], pairs), "",
        f"median of per-pair ratios 2D/1D = {r['median_ratio']:.3f} (range {r['min_ratio']:.3f}–{r['max_ratio']:.3f},"
        f" {r['pairs']} pairs)",
    ])
