"""One function that parallelizes a model with a resolved plan, in torchtitan's order:

    materialise (CPU) → dtype → float8 → tensor parallel → activation checkpointing (or sharded
    saves) → async TP → compile → FSDP2 → materialise → sequence-length check

Each step is a function of this package that works on any ``nn.Module`` and a ``DeviceMesh``;
:func:`parallelize` only sequences them, and imports nothing from Lightning (the strategy passes
its precision plugin's dtype conversion in as a callable).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from lightning_tp import _compat
from lightning_tp.config import ParallelConfig
from lightning_tp.errors import ModelShapeError
from lightning_tp.parallel.fsdp import apply_fsdp
from lightning_tp.parallel.grid import split_grid_styles, tp_mesh_of
from lightning_tp.parallel.heads import localize_kv_groups
from lightning_tp.parallel.lora import (
    adapt_styles,
    keep_dropout_masks,
    lora_layers,
    reset_adapters,
)
from lightning_tp.parallel.plans import ResolvedPlan
from lightning_tp.parallel.recompute import apply_activation_checkpointing, compile_blocks
from lightning_tp.parallel.shapes import install_sequence_check
from lightning_tp.parallel.sharded_saves import save_sharded_inputs

__all__ = ["apply_tensor_parallel", "convert_to_float8", "freeze_in", "materialize", "parallelize"]


def parallelize(module: nn.Module, plan: ResolvedPlan, config: ParallelConfig, mesh: Any,
                device: torch.device, *, mp_policy: Any = None, seed: Optional[int] = None,
                convert_dtype: Optional[Callable[[nn.Module], Any]] = None) -> None:
    """Shard ``module`` in place on the 2D ``mesh`` (dims ``"data_parallel"``,
    ``"tensor_parallel"``) as ``config`` says (its sizes resolved to ints), with FSDP2's
    ``mp_policy``.

    ``convert_dtype`` casts the module to a true-precision dtype before sharding, so that FSDP2
    shards the final dtype. ``seed`` is passed to the model roots' ``init_weights``.
    """
    tp_mesh, dp_mesh = tp_mesh_of(mesh), mesh["data_parallel"]
    tp = tp_mesh.size()
    if device.type == "cpu":
        # DTensor's random ops are coordinated across ranks only on accelerators; on CPU every
        # shard would draw the same numbers (duplicate heads and rows that never become
        # different). So on CPU the full model is initialised identically on every rank and then
        # sharded; on GPUs it is sharded on the meta device and each rank initialises its shards.
        materialize(module, plan, device, seed)
    if convert_dtype is not None:
        convert_dtype(module)
    adapters = bool(lora_layers(module))
    if adapters and mp_policy is not None and mp_policy.param_dtype is not None:
        freeze_in(module, mp_policy.param_dtype)
    if config.float8:
        convert_to_float8(module, plan)
    if plan.grid is not None:
        apply_tensor_parallel(module, plan, tp_mesh, grid_mesh=mesh["tp_row", "tp_col"])
    elif tp > 1:
        apply_tensor_parallel(module, plan, tp_mesh)
    elif adapters:
        keep_dropout_masks(module)  # what the LoRA styles' forward does at tp > 1
    apply_activation_checkpointing(module, plan, config.activation_checkpointing)
    if config.save_sharded_inputs and tp > 1:  # SP's gathered block inputs: keep shards, regather
        save_sharded_inputs(module, plan, tp_mesh)
    if config.async_tp:
        _compat.enable_async_tp(tp_mesh.get_group().group_name)
    if config.compile:
        compile_blocks(module, plan)
    if config.fsdp:
        apply_fsdp(module, plan, dp_mesh, mp_policy, config.reshard_after_forward,
                   shard_frozen=not adapters)
    materialize(module, plan, device, seed)
    if plan.grid is not None:
        install_sequence_check(module, plan, plan.grid[0],
                               f"the grid's rows (tensor_parallel_size={plan.grid})")
    elif config.sequence_parallel and tp > 1:
        install_sequence_check(module, plan, tp)


def apply_tensor_parallel(module: nn.Module, plan: ResolvedPlan, tp_mesh: Any,
                          grid_mesh: Any = None) -> None:
    """Shard ``module`` in place with ``plan.styles`` over the 1D ``tp_mesh`` (a 2D plan's grid
    styles over ``grid_mesh``, its ``(tp_row, tp_col)`` mesh); keeps tied weights tied."""
    tied = _tied_parameters(module)
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    if plan.grid is not None:
        over_grid, over_flat = split_grid_styles(plan.styles)
        parallelize_module(module, tp_mesh, over_flat)
        parallelize_module(module, grid_mesh, over_grid)
    else:
        parallelize_module(module, tp_mesh, adapt_styles(module, plan.styles))
    # torch's styles register new parameters that require gradients: keep frozen what was
    for name, param in module.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    localize_kv_groups(module)  # transformers' attention: query heads per local KV head
    # Each style creates its own DTensor parameter, which unties shared weights (Llama's tied
    # embedding and lm_head are both sharded on dim 0, so one sharded tensor can serve both).
    for owner_path, others in tied.items():
        owner_mod, owner_attr = _split(module, owner_path)
        shared = getattr(owner_mod, owner_attr)
        for other in others:
            mod, attr = _split(module, other)
            if getattr(mod, attr).placements != shared.placements:
                raise ModelShapeError(
                    f"Tied parameters {owner_path} and {other} were sharded differently by the plan"
                    f" ({shared.placements} vs {getattr(mod, attr).placements}); give both the same"
                    " sharding or untie them (tie_word_embeddings=False)."
                )
            setattr(mod, attr, shared)


def freeze_in(module: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen floating-point parameters of ``module`` in ``dtype`` (the LoRA base under
    ``bf16-mixed``: one 16-bit copy, never a 32-bit master, as it never steps)."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


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


def materialize(module: nn.Module, plan: ResolvedPlan, device: torch.device,
                seed: int | None = None) -> None:
    """Give meta-device parameters storage on ``device`` and initialise them explicitly.

    Model roots with ``init_weights()`` initialise themselves (with ``seed`` if their
    ``init_weights`` takes one); any other module that had meta tensors must provide
    ``reset_parameters()``. Tied parameters stay tied (``to_empty`` alone would untie plain
    tensors).
    """
    if not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        return
    meta_modules = [m for m in module.modules()
                    if any(t.is_meta for t in itertools.chain(m.parameters(recurse=False),
                                                              m.buffers(recurse=False)))]
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
    # PEFT adapters inside a root that just initialised itself: their own init, not a projection's
    reset_adapters(module, seed, only=done)
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
            f"Modules {sorted(set(missing))} were built on the meta device but define neither"
            " `init_weights()` on their model root nor `reset_parameters()`; their weights would be"
            " uninitialised memory."
        )


def convert_to_float8(module: nn.Module, plan: ResolvedPlan) -> None:
    """Swap the decoder blocks' ``nn.Linear`` layers for torchao float8 training linears (CUDA)."""
    from torchao.float8 import convert_to_float8_training

    def eligible(linear: nn.Module, _name: str) -> bool:
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    for path in plan.blocks:
        convert_to_float8_training(module.get_submodule(path), module_filter_fn=eligible)
