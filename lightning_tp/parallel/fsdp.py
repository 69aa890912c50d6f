"""FSDP2 over the data-parallel mesh: per decoder block, then per model root, then whatever else
holds parameters; and the mixed-precision policy each ``Trainer(precision=...)`` maps to."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lightning_tp.errors import ModelShapeError
from lightning_tp.parallel.plans import ResolvedPlan

__all__ = ["apply_fsdp", "mixed_precision_policy"]


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """``bf16-mixed``: bf16 compute on gathered parameters, fp32 gradient reduction and master
    shards. Every other supported precision (see :data:`lightning_tp.config.PRECISIONS`) keeps the
    module's own dtype: the true-precision ones convert the module before sharding."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(module: nn.Module, plan: ResolvedPlan, dp_mesh: Any, mp_policy: Any = None,
               reshard_after_forward: bool = True, shard_frozen: bool = True) -> list[nn.Module]:
    """FSDP2 per decoder block, then per model root, then any other direct child that still holds
    parameters.

    ``shard_frozen=False`` (LoRA) leaves parameters that do not require gradients out of FSDP2:
    they stay whole over the data-parallel ranks (TP-sharded only), are never all-gathered and get
    no gradient or optimizer state; FSDP2 shards what trains.

    The LightningModule itself is never wrapped: Lightning calls ``training_step``, not
    ``forward``, so a root-level FSDP unit would never unshard. Returns the modules made into FSDP
    units.
    """
    kwargs: dict[str, Any] = {"mesh": dp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if not shard_frozen:
        kwargs["ignored_params"] = {p for p in module.parameters() if not p.requires_grad}
    units: list[nn.Module] = []
    for path in plan.blocks:
        # The last block's parameters are needed again at the start of backward; keeping them
        # avoids an all-gather that would be issued immediately after the reshard.
        last = path == plan.blocks[-1]
        units.append(fully_shard(module.get_submodule(path),
                                 reshard_after_forward=reshard_after_forward and not last,
                                 **kwargs))
    for path in plan.roots:
        units.append(fully_shard(module.get_submodule(path),
                                 reshard_after_forward=reshard_after_forward, **kwargs))
    managed = {id(p) for unit in units for p in unit.parameters()}
    managed |= {id(p) for p in kwargs.get("ignored_params", ())}
    for _, child in module.named_children():
        if any(id(p) not in managed for p in child.parameters()):
            units.append(fully_shard(child, reshard_after_forward=reshard_after_forward, **kwargs))
    stray = [n for n, p in module.named_parameters(recurse=False)]
    if stray:
        raise ModelShapeError(
            f"Parameters {stray} sit directly on {type(module).__name__}, which FSDP cannot wrap"
            " (it never runs `forward`). Move them into a submodule."
        )
    return units
