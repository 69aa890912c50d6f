"""Activation checkpointing and per-block ``torch.compile``, applied without renaming any parameter.

Both wrap the *forward function* of each decoder block (an instance attribute), not the module: no
``_checkpoint_wrapped_module.`` or ``_orig_mod.`` appears in parameter names or state-dict keys, so
a checkpoint saved with one setting loads with any other, and FSDP2's hooks (installed afterwards on
the block itself) stay outside the checkpointed and compiled region. The strategy's order is
TP → activation checkpointing → compile → FSDP2.

Modes:

* ``"full"``: each block keeps only its input; everything inside is recomputed in backward.
* ``"selective"``: an op-level policy keeps what is expensive to recompute and cheap to store
  (sharded matmul outputs, attention outputs, the outputs of reduce-scatters and all-reduces) and
  recomputes the rest (norms, RoPE, SiLU, element-wise ops, all-gathers). A matmul whose input is
  sharded along its contraction dimension (the row-parallel ``o_proj``/``down_proj``) produces a
  full-size partial sum that exists only to be reduced; it is recomputed rather than kept, and the
  reduced result is kept instead, so nothing of full sequence × hidden size is stored under sequence
  parallelism.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_tp.config import AC_MODES
from lightning_tp.parallel.plans import ResolvedPlan

__all__ = ["apply_activation_checkpointing", "compile_blocks", "selective_policy"]

_MARK = "_lightning_tp_wrapped"


def _saved_ops() -> tuple[set[Any], set[Any]]:
    """(ops whose outputs are always kept, matmul ops kept unless they produce a partial sum)."""
    aten = torch.ops.aten
    keep = set()
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu"):
        op = getattr(aten, name, None)
        if op is not None:
            keep.add(op.default)
    functional = getattr(torch.ops, "_c10d_functional", None)
    if functional is not None:
        for name in ("reduce_scatter_tensor", "all_reduce"):
            op = getattr(functional, name, None)
            if op is not None:
                keep.add(op.default)
    matmuls = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    return keep, matmuls


def _contracts_over_shards(op: Any, args: tuple[Any, ...]) -> bool:
    """Whether a matmul's left operand is a DTensor sharded along its last (contraction)
    dimension."""
    from torch.distributed.tensor import DTensor

    left = args[1] if op is torch.ops.aten.addmm.default else args[0]
    return isinstance(left, DTensor) and any(p.is_shard(left.ndim - 1) for p in left.placements)


def selective_policy() -> Callable[..., Any]:
    """The op policy of ``"selective"`` for
    :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`."""
    from torch.utils.checkpoint import CheckpointPolicy

    keep, matmuls = _saved_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in keep or (op in matmuls and not _contracts_over_shards(op, args)):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _checkpointed(forward: Callable[..., Any], mode: str) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context_fn = None
    if mode == "selective":
        policy = selective_policy()
        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def _wrap_forward(block: nn.Module, kind: str,
                  wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    done = block.__dict__.setdefault(_MARK, [])
    if kind in done:
        raise RuntimeError(f"{type(block).__name__} already has {kind} applied; apply it once.")
    block.forward = wrap(block.forward)
    done.append(kind)


def apply_activation_checkpointing(module: nn.Module, plan: ResolvedPlan, mode: str) -> list[str]:
    """Checkpoint every decoder block of ``plan`` with ``mode``; returns the block paths changed."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is not a mode; choose one of"
                         f" {', '.join(AC_MODES)}.")
    if mode == "none":
        return []
    for path in plan.roots:
        # A transformers model with `use_cache` grows its KV cache in every forward, so a block
        # recomputed in backward would see the keys twice: the cache is useless in training, turn it
        # off (as transformers' own gradient checkpointing does).
        config = getattr(module.get_submodule(path), "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False
    for path in plan.blocks:
        _wrap_forward(module.get_submodule(path), "activation checkpointing",
                      functools.partial(_checkpointed, mode=mode))
    return list(plan.blocks)


def compile_blocks(module: nn.Module, plan: ResolvedPlan, **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` the forward of every decoder block (after checkpointing, before FSDP2)."""
    for path in plan.blocks:
        _wrap_forward(module.get_submodule(path), "compile",
                      lambda f: torch.compile(f, **compile_kwargs))
    return list(plan.blocks)
