"""Activation bytes kept for backward per decoder layer, against Korthikanti et al. (2022).

    python -m benchmarks activations [--quick] [--world 8]

The model runs in bf16 (16-bit activations, as the formulas assume). Two independent counts:

* **saved**: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd saves; unique
  storages are summed (a tensor saved by q, k and v counts once), parameters excluded. Under
  ``torch.utils.checkpoint`` the inner saves are hidden from an outer hook, so this count is only
  given without recompute.
* **held**: a ``TorchDispatchMode`` notes a weak reference to the storage of every tensor created during
  forward; after forward, the bytes of those still alive (parameters excluded) are what the graph, the
  checkpoint frames and the selective-recompute cache hold until backward. This works in every mode and
  agrees with **saved** without recompute.

Per layer = (2-layer model) − (1-layer model): embedding, final norm, ``lm_head`` and the RoPE tables
(shared by all layers) drop out. Each row also gives the same accounting derived by hand from the Llama
layer's code (RMSNorm normalising in fp32 but keeping its 16-bit input, SwiGLU of width I, grouped-query
attention, no dropout, SDPA/flash attention that keeps only its output and log-sum-exp instead of the s×s
scores), so the gap to the GPT formulas is explained term by term.

Each case also runs backward (of the sum of the stack's output), counting the collectives per layer of
forward and backward with the same dispatch mode, and the case ``tp+sp+sharded``
(``save_sharded_inputs=True``: :mod:`lightning_tp.parallel.sharded_saves`) compares its gradients with
those of ``tp+sp`` (they must be equal: the same shard is gathered again). TP degrees are those of
1, 2, 4 and 8 that divide the launched ranks (``--world 8`` for tp = 8); at tp = 8 the model has 8 KV
heads instead of 4, which 8 ranks cannot split (the replicated-KV layout keeps extra weight rows per rank,
another accounting).
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import bench_config, table

# ----------------------------------------------------------------------------- formulas


def korthikanti(case: str, s: int, b: int, h: int, a: int, t: int) -> float:
    """Bytes per GPT layer (16-bit activations, 4h GeLU MLP, LayerNorm, dropout) from Korthikanti et al. 2022."""
    sbh = s * b * h
    if case == "none":
        return sbh * (34 + 5 * a * s / h) if t == 1 else sbh * (10 + 24 / t + 5 * a * s / (h * t))
    if case == "sp":
        return sbh / t * (34 + 5 * a * s / h)
    if case == "selective":
        return 34 * sbh / t
    if case == "full":
        return 2 * sbh / t
    raise ValueError(f"unknown case {case!r}")


def llama_terms(config: Any, s: int, b: int, t: int, sp: bool, mode: str,
                sharded: bool = False) -> dict[str, float]:
    """Bytes per layer that the Llama layer of :mod:`lightning_tp.models.llama` keeps, item by item.

    bf16 activations (2 bytes), fp32 where the code computes in fp32 (RMSNorm's upcast, attention's
    log-sum-exp). ``sp`` shards the norms' tensors over ``t``; projections are sharded over ``t`` by TP.
    ``sharded``: the projection inputs are kept as their sequence shard (``save_sharded_inputs``).
    """
    p, f = 2, 4
    h, i, a, kv, d = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                      config.num_key_value_heads, config.resolved_head_dim)
    tokens = s * b
    r = t if sp else 1  # shard factor of the tensors between the TP regions
    if mode == "full":
        return {"block input (checkpoint)": p * tokens * h / r}
    if mode == "selective":
        return {
            "block input (checkpoint)": p * tokens * h / r,
            "q/k/v matmul outputs": p * tokens * (a + 2 * kv) * d / t,
            "attention output + log-sum-exp": p * tokens * a * d / t + f * tokens * a / t,
            "gate/up matmul outputs": 2 * p * tokens * i / t,
            "o_proj/down_proj outputs (after reduce-scatter or all-reduce)": 2 * p * tokens * h / r,
        }
    return {
        # RMSNorm keeps its bf16 input and one fp32 rsqrt per token (lightning_tp.models.llama._RMSNormFunction)
        "2 RMSNorm (bf16 input, fp32 rsqrt)": 2 * (p * tokens * h + f * tokens) / r,
        # The input of q/k/v and gate/up: under SP the all-gathered (full) tensor is what the matmul keeps,
        # unless only its sequence shard is kept and gathered again in backward.
        **({"2 projection inputs (sequence shards, regathered in backward)": 2 * p * tokens * h / r}
           if sharded else {"2 projection inputs (all-gathered under SP)": 2 * p * tokens * h}),
        "q, k, v after RoPE (kept by attention)": p * tokens * (a + 2 * kv) * d / t,
        "attention output (= o_proj input) + log-sum-exp": p * tokens * a * d / t + f * tokens * a / t,
        "gate, SiLU(gate), up, product (down_proj input)": 4 * p * tokens * i / t,
    }


# ----------------------------------------------------------------------------- measurement

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


class _StorageTracker:
    """Weak references to the storage of every plain tensor produced while active (DTensors are desugared),
    and a count of the functional collectives issued meanwhile: the ops ``CommDebugMode`` counts, counted here
    because ``CommDebugMode``'s module tracker fails on the blocks that checkpointing recomputes in backward."""

    def __init__(self) -> None:
        import collections

        import torch
        from torch.distributed.tensor import DTensor
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        seen: dict[int, tuple[Any, int]] = {}
        self.seen = seen
        self.collectives: collections.Counter[str] = collections.Counter()
        counts = self.collectives

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                if isinstance(func, torch._ops.HigherOrderOperator):
                    return func(*args, **kwargs)
                if any(issubclass(cls, DTensor) for cls in types):
                    return NotImplemented  # let DTensor run; its local ops come back through this mode
                name = getattr(getattr(func, "_overloadpacket", None), "__name__", "")
                if getattr(func, "namespace", "") == "_c10d_functional" and name in COLLECTIVES:
                    counts[name] += 1
                out = func(*args, **kwargs)
                for x in tree_flatten(out)[0]:
                    if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) and x.device.type != "meta":
                        storage = x.untyped_storage()
                        seen[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                return out

        self.mode = Mode()

    def alive_bytes(self, exclude: set[int]) -> int:
        return sum(n for key, (ref, n) in self.seen.items() if key not in exclude and not ref.expired())


def _storage_key(x: Any) -> int:
    from torch.distributed.tensor import DTensor

    local = x._local_tensor if isinstance(x, DTensor) else x
    return local.untyped_storage()._cdata


def _local(x: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return x.to_local() if isinstance(x, DTensor) else x


def _forward_bytes(config: Any, mesh: Any, sp: bool, mode: str, batch: int, seq: int,
                   sharded: bool = False) -> dict[str, Any]:
    """Bytes held after forward, then one backward: collectives of each phase and the gradients."""
    import gc

    import torch

    from lightning_tp.models import Llama
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan
    from lightning_tp.parallel.shapes import check_model_shapes

    recompute = _recompute_module()
    model = Llama(config)
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16)
    plan = resolve_plan(model, "llama", sequence_parallel=sp, loss_parallel=False)
    if mesh is not None:
        check_model_shapes(model, plan, mesh.size())
        apply_tensor_parallel(model, plan, mesh)
    recompute.apply_activation_checkpointing(model, plan, mode)
    if sharded:
        from lightning_tp.parallel.sharded_saves import save_sharded_inputs

        save_sharded_inputs(model, plan, mesh)
    static = {_storage_key(x) for x in [*model.parameters(), *model.buffers()]}
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        key = _storage_key(x)
        if key not in static:
            saved[key] = (x._local_tensor if hasattr(x, "_local_tensor") else x).untyped_storage().nbytes()
        return x

    tracker = _StorageTracker()
    # The decoder stack only (no lm_head): the (gathered) logits and their collective's buffers, which the process
    # group may or may not have released when the count is taken, are not per-layer bytes and made it noisy.
    with tracker.mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        hidden = model.model(tokens)
    gc.collect()  # only what something still refers to
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # collectives finished on every rank, their work objects released
    held = tracker.alive_bytes(static)
    collectives = {"forward": dict(tracker.collectives)}
    tracker.collectives.clear()
    with tracker.mode:
        _local(hidden).float().sum().backward()
    collectives["backward"] = dict(tracker.collectives)
    grads = {name: _local(p.grad) for name, p in model.named_parameters()}
    del hidden
    return {"saved": sum(saved.values()), "held": held, "collectives": collectives, "grads": grads}


def _recompute_module() -> Any:
    try:
        from lightning_tp.parallel import recompute
    except ImportError:  # older layout: the function lived in apply.py
        from lightning_tp.parallel import apply as recompute
    if not hasattr(recompute, "apply_activation_checkpointing"):
        raise ImportError("lightning_tp.parallel has no apply_activation_checkpointing; update the package")
    return recompute


CASES = {  # label -> (sequence_parallel, recompute mode, Korthikanti case, save_sharded_inputs)
    "none": (False, "none", "none", False),
    "tp": (False, "none", "none", False),
    "tp+sp": (True, "none", "sp", False),
    "tp+sp+sharded": (True, "none", "sp", True),
    "selective": (False, "selective", "selective", False),
    "tp+sp+selective": (True, "selective", "selective", False),
    "full": (False, "full", "full", False),
    "tp+sp+full": (True, "full", "full", False),
}


def _per_layer(one: dict[str, int], two: dict[str, int]) -> dict[str, int]:
    return {k: two.get(k, 0) - one.get(k, 0) for k in sorted(set(one) | set(two)) if two.get(k, 0) != one.get(k, 0)}


def _max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |a − b| over every gradient element of every rank (``lm_head``, outside the stack, has none)."""
    import torch
    import torch.distributed as dist

    if {n for n, x in a.items() if x is None} != {n for n, x in b.items() if x is None}:
        return float("inf")
    worst = torch.tensor(max((x.float() - b[n].float()).abs().max().item() for n, x in a.items() if x is not None))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def measure(tps: list[int] | None = None, batch: int = 1, seq: int = 256) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    tps = tps or [t for t in (1, 2, 4, 8) if world % t == 0]
    rows = []
    for t in tps:
        # 8 ranks cannot split the 4 KV heads: at tp 8 one KV head per rank
        config = bench_config("activations", **({"num_key_value_heads": 8} if t == 8 else {}))
        mesh = None if t == 1 else init_device_mesh("cpu", (world // t, t), mesh_dim_names=("dp", "tp"))["tp"]
        labels = (["none", "selective", "full"] if t == 1
                  else ["tp", "tp+sp", "tp+sp+sharded", "tp+sp+selective", "tp+sp+full"])
        grads: dict[str, Any] = {}
        for label in labels:
            sp, mode, kcase, sharded = CASES[label]
            one, two = (_forward_bytes(config.replace(num_hidden_layers=n), mesh, sp, mode, batch, seq, sharded)
                        for n in (1, 2))
            grads[label] = two.pop("grads")
            terms = llama_terms(config, seq, batch, t, sp, mode, sharded)
            rows.append({
                "case": label, "tp": t, "kv_heads": config.num_key_value_heads,
                "saved": two["saved"] - one["saved"] if mode == "none" and not sharded else None,
                "held": two["held"] - one["held"], "llama_formula": sum(terms.values()), "terms": terms,
                "korthikanti": korthikanti(kcase, seq, batch, config.hidden_size, config.num_attention_heads, t),
                "per_layer": {phase: _per_layer(one["collectives"][phase], two["collectives"][phase])
                              for phase in ("forward", "backward")},
            })
            if sharded:  # the same shard gathered again: the gradients of tp+sp exactly
                rows[-1]["grad_max_abs_diff"] = _max_abs_diff(grads[label], grads["tp+sp"])
    return {"rows": rows, "seq": seq, "batch": batch, "hidden": config.hidden_size,
            "heads": config.num_attention_heads, "kv_heads": bench_config("activations").num_key_value_heads,
            "intermediate": config.intermediate_size}


_SHORT = {"all_gather_into_tensor": "AG", "reduce_scatter_tensor": "RS", "all_reduce": "AR", "all_to_all_single": "A2A"}


def _counts(counts: dict[str, int]) -> str:
    return " + ".join(f"{n} {_SHORT.get(op, op)}" for op, n in sorted(counts.items())) or "none"


def report(result: dict[str, Any]) -> str:
    s, b, h = result["seq"], result["batch"], result["hidden"]
    lines = [f"## Activation bytes kept for backward per decoder layer (bf16; s={s}, b={b}, h={h},"
             f" a={result['heads']}, kv={result['kv_heads']} (8 at tp=8), I={result['intermediate']})", ""]
    body = []
    for r in result["rows"]:
        measured = r["held"]
        body.append([r["case"], r["tp"], r["saved"] if r["saved"] is not None else "n/a (hidden)",
                     measured, int(r["llama_formula"]), int(r["korthikanti"]),
                     f"{measured / r['korthikanti']:.3f}", f"{measured / (s * b * h):.2f}",
                     _counts(r["per_layer"]["forward"]), _counts(r["per_layer"]["backward"])])
    lines.append(table(["case", "tp", "saved (hooks)", "held after forward", "Llama formula", "Korthikanti",
                        "held / Korthikanti", "held / (s·b·h)", "forward collectives", "backward collectives"],
                       body))
    for r in result["rows"]:
        if "grad_max_abs_diff" in r:
            lines.append(f"\n{r['case']} tp={r['tp']}: gradients vs tp+sp, max |difference| ="
                         f" {r['grad_max_abs_diff']:.3g}")
    lines.append("\nLlama accounting behind the 'Llama formula' column, bytes per layer:")
    for r in result["rows"]:
        if r["case"] in ("tp+sp", "tp+sp+sharded", "tp+sp+selective") or (
                r["tp"] == 1 and r["case"] in ("none", "selective")):
            items = "; ".join(f"{k}: {int(v):,}" for k, v in r["terms"].items())
            lines.append(f"- {r['case']} tp={r['tp']}: {items}")
    return "\n".join(lines)
