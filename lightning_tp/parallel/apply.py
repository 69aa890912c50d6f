"""Apply a resolved plan: shape checks, tensor parallelism, FSDP2, materialisation, gradient clipping.

Order (torchtitan's): TP → activation checkpointing → compile (both in :mod:`lightning_tp.parallel.recompute`)
→ FSDP per decoder block → FSDP per model root → materialise → init.
Each function works on any ``nn.Module`` and a ``DeviceMesh``; the strategy only sequences them.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tp.errors import ModelShapeError
from lightning_tp.parallel.plans import ResolvedPlan
from lightning_tp.parallel.recompute import apply_activation_checkpointing, compile_blocks

__all__ = [
    "apply_activation_checkpointing",
    "apply_fsdp",
    "apply_tensor_parallel",
    "check_model_shapes",
    "clip_grad_norm_",
    "compile_blocks",
    "materialize",
    "shape_problems",
    "total_grad_norm",
]

# (config attribute, what it sizes) for every dimension the Llama plan shards over tp.
_SHARDED_DIMS = (
    ("num_attention_heads", "query heads (q_proj/o_proj are split by head)"),
    ("num_key_value_heads", "key/value heads (k_proj/v_proj are split by head)"),
    ("intermediate_size", "MLP width (gate/up/down are split along it)"),
    ("vocab_size", "vocabulary (embed_tokens/lm_head are split along it)"),
)


def shape_problems(config: Any, tp: int) -> list[str]:
    """One message per dimension of a model ``config`` that the Llama plan cannot split over ``tp`` ranks."""
    problems = []
    for attr, what in _SHARDED_DIMS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value % tp != 0:
            fix = (f"pad vocab_size to {math.ceil(value / tp) * tp}" if attr == "vocab_size"
                   else f"choose a tensor_parallel_size that divides {value}")
            problems.append(f"{attr}={value} ({what}) is not divisible by tensor_parallel_size={tp}: {fix}")
    return problems


def check_model_shapes(module: nn.Module, plan: ResolvedPlan, tp: int) -> None:
    """Raise one :class:`ModelShapeError` listing every dimension of every model root not divisible by ``tp``."""
    if tp == 1:
        return
    problems = []
    for root in plan.roots:
        config = getattr(module.get_submodule(root), "config", None)
        if config is not None:
            problems += shape_problems(config, tp)
    if problems:
        raise ModelShapeError("Cannot shard the model: " + "; ".join(problems) + ".")


def apply_tensor_parallel(module: nn.Module, plan: ResolvedPlan, tp_mesh: Any) -> None:
    """Shard ``module`` in place with ``plan.styles`` over the 1D ``tp_mesh``; keeps tied weights tied."""
    from torch.distributed.tensor.parallel import parallelize_module

    tied = _tied_parameters(module)
    parallelize_module(module, tp_mesh, plan.styles)
    # Each style creates its own DTensor parameter, which unties shared weights (Llama's tied embedding and
    # lm_head are both sharded on dim 0, so one sharded tensor can serve both).
    for owner_path, others in tied.items():
        owner_mod, owner_attr = _split(module, owner_path)
        shared = getattr(owner_mod, owner_attr)
        for other in others:
            mod, attr = _split(module, other)
            if getattr(mod, attr).placements != shared.placements:
                raise ModelShapeError(
                    f"Tied parameters {owner_path} and {other} were sharded differently by the plan"
                    f" ({shared.placements} vs {getattr(mod, attr).placements}); give both the same sharding"
                    " or untie them (tie_word_embeddings=False)."
                )
            setattr(mod, attr, shared)


def _tied_parameters(module: nn.Module) -> dict[str, list[str]]:
    seen: dict[int, str] = {}
    tied: dict[str, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.setdefault(seen[id(param)], []).append(name)
        else:
            seen[id(param)] = name
    return tied


def _split(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, attr = path.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


def apply_fsdp(module: nn.Module, plan: ResolvedPlan, dp_mesh: Any, mp_policy: Any = None,
               reshard_after_forward: bool = True) -> list[nn.Module]:
    """FSDP2 per decoder block, then per model root, then any other direct child that still holds parameters.

    The LightningModule itself is never wrapped: Lightning calls ``training_step``, not ``forward``, so a
    root-level FSDP unit would never unshard. Returns the modules made into FSDP units.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": dp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    units: list[nn.Module] = []
    for path in plan.blocks:
        # The last block's parameters are needed again at the start of backward; keeping them avoids an
        # all-gather that would be issued immediately after the reshard.
        last = path == plan.blocks[-1]
        units.append(fully_shard(module.get_submodule(path), reshard_after_forward=reshard_after_forward and not last,
                                 **kwargs))
    for path in plan.roots:
        units.append(fully_shard(module.get_submodule(path), reshard_after_forward=reshard_after_forward, **kwargs))
    managed = {id(p) for unit in units for p in unit.parameters()}
    for _, child in module.named_children():
        if any(id(p) not in managed for p in child.parameters()):
            units.append(fully_shard(child, reshard_after_forward=reshard_after_forward, **kwargs))
    stray = [n for n, p in module.named_parameters(recurse=False)]
    if stray:
        raise ModelShapeError(
            f"Parameters {stray} sit directly on {type(module).__name__}, which FSDP cannot wrap (it never runs"
            " `forward`). Move them into a submodule."
        )
    return units


def materialize(module: nn.Module, plan: ResolvedPlan, device: torch.device, seed: int | None = None) -> None:
    """Give meta-device parameters storage on ``device`` and initialise them explicitly.

    Model roots with ``init_weights()`` initialise themselves (with ``seed`` if their ``init_weights`` takes
    one); any other module that had meta tensors must provide ``reset_parameters()``. Tied parameters stay
    tied (``to_empty`` alone would untie plain tensors).
    """
    if not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        return
    meta_modules = [m for m in module.modules()
                    if any(t.is_meta for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)))]
    tied = _tied_parameters(module)
    module.to_empty(device=device)
    for owner, others in tied.items():
        owner_mod, owner_attr = _split(module, owner)
        for other in others:
            mod, attr = _split(module, other)
            setattr(mod, attr, getattr(owner_mod, owner_attr))
    done: set[int] = set()
    for path in plan.roots:
        root = module.get_submodule(path)
        init = getattr(root, "init_weights", None)
        if callable(init):
            if seed is not None and "seed" in inspect.signature(init).parameters:
                init(seed=seed)
            else:
                init()
            done.update(id(m) for m in root.modules())
    missing = []
    for m in meta_modules:
        if id(m) in done:
            continue
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
        else:
            missing.append(type(m).__name__)
    if missing:
        raise TypeError(
            f"Modules {sorted(set(missing))} were built on the meta device but define neither `init_weights()` on"
            " their model root nor `reset_parameters()`; their weights would be uninitialised memory."
        )


@torch.no_grad()
def total_grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients together, as one device would compute it, whatever meshes they live on.

    When every gradient is a DTensor without partial sums (the usual case after FSDP2), each rank adds up its
    own shards, divides by how many ranks hold the same values, and one all-reduce over the world gives every
    rank the identical total. Otherwise norms are computed per mesh with DTensor reductions and combined;
    ``torch.nn.utils.clip_grad_norm_`` instead stacks them and fails across meshes.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if dist.is_initialized() and all(isinstance(g, DTensor) and not any(p.is_partial() for p in g.placements)
                                     for g in grads):
        return _world_norm(grads, norm_type)
    groups: dict[Any, list[Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    return stacked.max() if math.isinf(norm_type) else torch.linalg.vector_norm(stacked, norm_type)


def _world_norm(grads: list[Any], norm_type: float) -> Tensor:
    import torch.distributed as dist

    world = dist.get_world_size()
    device = grads[0].to_local().device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        local = g.to_local().detach()
        if math.isinf(norm_type):
            total = torch.maximum(total, local.abs().max().double() if local.numel() else total)
            continue
        # ranks holding the same values: replicated mesh dims, and the world ranks outside this mesh
        copies = world // g.device_mesh.size()
        for dim, placement in enumerate(g.placements):
            if placement.is_replicate():
                copies *= g.device_mesh.size(dim)
        total += local.double().abs().pow(norm_type).sum() / copies
    dist.all_reduce(total, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM)
    result = total if math.isinf(norm_type) else total.pow(1.0 / norm_type)
    return result.to(grads[0].dtype)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale every gradient in place so that :func:`total_grad_norm` is at most ``max_norm``; returns the norm."""
    from torch.distributed.tensor import DTensor

    parameters = list(parameters)
    total = total_grad_norm(parameters, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            local.mul_(coef.to(local.device, local.dtype))
    return total
