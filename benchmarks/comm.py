"""Collectives and bytes per decoder layer against the Megatron minimum.

    python -m benchmarks comm [--quick]

For each plan (ours with and without sequence parallelism, and the per-projection baseline) and each TP
degree, a 1-layer and a 2-layer model run one forward (to the loss) and one backward under a
``CommDebugMode`` that also records every functional collective's input size. The difference between the
two models is one layer, so embedding, ``lm_head`` and the vocab-parallel loss drop out.

Bytes convention (the one behind Narayanan et al.'s ``8·b·s·h·(t−1)/t``): elements *sent per device* by
a ring algorithm. An all-reduce of N elements sends ``2·N·(t−1)/t``; an all-gather producing N elements
and a reduce-scatter consuming N elements send ``N·(t−1)/t`` each. Multiply elements by 2 for bf16
activations and by 4 for fp32; this benchmark runs in fp32 and reports elements, so the dtype cancels.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import bench_config, table

# expected collectives per layer at the Megatron minimum, {phase: {op: count}}
MINIMUM = {
    "tp": {"forward": {"all_reduce": 2}, "backward": {"all_reduce": 2}},
    "tp+sp": {"forward": {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2},
              "backward": {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}},
}
CASES = (  # (label, plan, sequence_parallel, loss_parallel)
    ("ours tp+sp", "llama", True, True),
    ("ours tp", "llama", False, False),
    ("per-projection tp", "llama_per_projection", False, False),
)


def megatron_elements(b: int, s: int, h: int, t: int) -> float:
    """Narayanan et al. 2021 §3.2: elements each device sends per layer, forward + backward."""
    return 8 * b * s * h * (t - 1) / t


def ring_elements(op: str, numel: int, t: int) -> float:
    """Elements one device sends in a ring implementation of ``op`` on an input of ``numel`` elements."""
    if op == "all_reduce":
        return 2 * numel * (t - 1) / t
    if op == "all_gather_into_tensor":
        return numel * (t - 1)  # the input is the local shard; the output has numel·t elements
    if op == "reduce_scatter_tensor":
        return numel * (t - 1) / t
    raise ValueError(f"no ring cost model for collective {op!r}")


def _recording_mode() -> Any:
    from torch.distributed.distributed_c10d import _resolve_process_group
    from torch.distributed.tensor.debug import CommDebugMode

    class CommBytesMode(CommDebugMode):
        """``CommDebugMode`` that also keeps (op, input elements, group size) of every functional collective."""

        def __init__(self) -> None:
            super().__init__()
            self.records: list[tuple[str, int, int]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = super().__torch_dispatch__(func, types, args, kwargs)
            packet = getattr(func, "_overloadpacket", None)
            name = getattr(packet, "__name__", "")
            if out is not NotImplemented and getattr(func, "namespace", "") == "_c10d_functional" and name in (
                "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"
            ):
                group = args[-1] if not kwargs or "group_name" not in kwargs else kwargs["group_name"]
                self.records.append((name, int(args[0].numel()), _resolve_process_group(group).size()))
            return out

    return CommBytesMode()


def _one_step(config: Any, mesh: Any, plan: str, sp: bool, lp: bool, batch: int, seq: int) -> dict[str, Any]:
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.models import Llama
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan
    from lightning_tp.parallel.shapes import check_model_shapes

    model = Llama(config)
    model.init_weights(seed=0)
    resolved = resolve_plan(model, plan, sequence_parallel=sp, loss_parallel=lp)
    check_model_shapes(model, resolved, mesh.size())
    apply_tensor_parallel(model, resolved, mesh)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for phase in ("forward", "backward"):
        mode = _recording_mode()
        with mode, (loss_parallel() if lp else contextlib.nullcontext()):
            if phase == "forward":
                logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            else:
                loss.backward()
        out[phase] = {"counts": {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()},
                      "records": mode.records}
    return out


def measure(tps: list[int] | None = None, batch: int = 2, seq: int = 128) -> dict[str, Any]:
    """Per-layer collectives and elements sent for every case in :data:`CASES` and TP degree in ``tps``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    tps = tps or [t for t in (2, 4) if world % t == 0]
    rows = []
    for t in tps:
        if world % t:
            raise ValueError(f"tp={t} does not divide the {world} launched ranks")
        mesh = init_device_mesh("cpu", (world // t, t), mesh_dim_names=("dp", "tp"))["tp"]
        for label, plan, sp, lp in CASES:
            runs = {layers: _one_step(bench_config("comm", num_hidden_layers=layers), mesh, plan, sp, lp, batch, seq)
                    for layers in (1, 2)}
            per_layer: dict[str, Any] = {}
            elements = 0.0
            for phase in ("forward", "backward"):
                ops = set(runs[1][phase]["counts"]) | set(runs[2][phase]["counts"])
                counts = {op: runs[2][phase]["counts"].get(op, 0) - runs[1][phase]["counts"].get(op, 0) for op in ops}
                per_layer[phase] = {op: n for op, n in sorted(counts.items()) if n}
                sent = [sum(ring_elements(op, n, g) for op, n, g in runs[layers][phase]["records"])
                        for layers in (1, 2)]
                elements += sent[1] - sent[0]
            h = bench_config("comm").hidden_size
            minimum = MINIMUM["tp+sp" if sp else "tp"]
            rows.append({"case": label, "tp": t, "per_layer": per_layer, "minimum": minimum,
                         "at_minimum": per_layer == {p: dict(sorted(c.items())) for p, c in minimum.items()},
                         "elements": elements, "megatron_elements": megatron_elements(batch, seq, h, t),
                         "batch": batch, "seq": seq, "hidden": h})
    return {"rows": rows}


def _fmt_counts(counts: dict[str, int]) -> str:
    short = {"all_reduce": "AR", "all_gather_into_tensor": "AG", "reduce_scatter_tensor": "RS"}
    return " + ".join(f"{n} {short.get(op, op)}" for op, n in counts.items()) or "0"


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    r0 = rows[0]
    lines = [f"## Collectives per decoder layer (b={r0['batch']}, s={r0['seq']}, h={r0['hidden']}, fp32 run,"
             " elements sent per device by a ring algorithm)", ""]
    body = []
    for r in rows:
        ratio = r["elements"] / r["megatron_elements"]
        body.append([r["case"], r["tp"], _fmt_counts(r["per_layer"]["forward"]),
                     _fmt_counts(r["per_layer"]["backward"]), "yes" if r["at_minimum"] else "no",
                     int(round(r["elements"])), int(round(r["megatron_elements"])), f"{ratio:.3f}"])
    lines.append(table(["case", "tp", "forward", "backward", "= minimum", "elements/layer",
                        "Megatron 8·b·s·h·(t−1)/t", "ratio"], body))
    by = {(r["case"], r["tp"]): r for r in rows}
    for t in sorted({r["tp"] for r in rows}):
        ours, base = by.get(("ours tp", t)), by.get(("per-projection tp", t))
        if ours and base:
            lines.append(f"\ntp={t}: per-projection / ours (TP only) elements per layer ="
                         f" {base['elements'] / ours['elements']:.3f}")
    return "\n".join(lines)
