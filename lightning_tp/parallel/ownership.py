"""Who parallelizes a model: the strategy's plan, or the user's own ``configure_model()``.

The marks of a user's parallelization (DTensor parameters, FSDP2 modules), the FSDP1 wrappers no
plan can shard, and the messages that say which choice was made and how to make another. Shared
by the strategy (on every rank, after ``configure_model()``) and the launch preflight (in the
launching process, before any rank exists).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from lightning_tp.config import ParallelConfig
from lightning_tp.errors import UnsupportedFeatureError, UnsupportedModuleError

__all__ = [
    "configure_model_required",
    "has_parameters",
    "no_plan_found",
    "refuse_plan_features",
    "reject_fsdp1",
    "user_parallelism",
]


def reject_fsdp1(module: nn.Module, owner: str) -> None:
    """Raise :class:`UnsupportedModuleError` (a ``TypeError``, as the parent's) if any module is
    wrapped with FSDP1."""
    if not any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return
    wrapped = [n or type(module).__name__ for n, m in module.named_modules()
               if isinstance(m, FullyShardedDataParallel)] or "some of its modules"
    raise UnsupportedModuleError(
        f"Found modules that are wrapped with `torch.distributed.fsdp.FullyShardedDataParallel`"
        f" (FSDP1): {wrapped}. The `{owner}` only supports the new FSDP2 APIs in PyTorch >= 2.4."
        f" Fix: remove the wrapper and pass the plain model ({owner} applies FSDP2 after tensor"
        " parallelism), or call `fully_shard` (FSDP2) yourself in configure_model() with"
        " plan=None."
    )


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def user_parallelism(module: nn.Module) -> tuple[int, int]:
    """How many DTensor parameters and FSDP2 modules ``module`` holds: the marks of a user's own
    parallelization."""
    dtensors = sum(isinstance(p, DTensor) for p in module.parameters())
    return dtensors, sum(isinstance(m, FSDPModule) for m in module.modules())


def configure_model_required(owner: str) -> str:
    return (f"When using the {owner} with plan=None, you are required to override the"
            " `configure_model()` hook in the LightningModule and apply parallelization there (as"
            " with ModelParallelStrategy). Fix: add configure_model(), or use plan='auto' for a"
            " Llama-family model the strategy shards for you.")


def no_plan_found(owner: str, module: nn.Module, plan: Any, user_hook: bool) -> str:
    what = (f"plan={plan!r} found no model it recognises in {type(module).__name__}: it looks for"
            " a Llama-family causal LM (`model.layers[i].self_attn`, `.mlp`, `lm_head`, as in"
            " lightning_tp.models.Llama or transformers' LlamaForCausalLM), and configure_model()"
            " did not parallelize it (no DTensor parameters, no FSDP2 modules).")
    if user_hook:
        return (f"{what} Fix: pass plan=None to keep ModelParallelStrategy's behaviour (the model"
                " is trained as configure_model() left it), parallelize it in configure_model()"
                " with `self.device_mesh`, or pass `plan=` a dict {module glob: ParallelStyle} or a"
                " callable.")
    return (f"{what} Fix: pass `plan=` a dict {{module glob: ParallelStyle}} or a callable, or pass"
            " plan=None: then, as with ModelParallelStrategy, you are required to override the"
            " `configure_model()` hook in the LightningModule and apply parallelization there"
            f" ({owner} keeps its clipping, loss parallel and checkpoints).")


def refuse_plan_features(config: ParallelConfig, why: str) -> None:
    """Options that act on the decoder blocks the strategy's own plan finds cannot apply to a
    user's parallelization: raise :class:`UnsupportedFeatureError` naming those that are set."""
    asked = [f"{name}={getattr(config, name)!r}" for name, off in (
        ("activation_checkpointing", "none"), ("compile", False), ("async_tp", False),
        ("float8", False), ("save_sharded_inputs", False)) if getattr(config, name) != off]
    if asked:
        raise UnsupportedFeatureError(
            f"{', '.join(asked)} act on the decoder blocks found by the strategy's own plan, which"
            f" does not apply to {why}. Fix: leave them at their defaults and apply them yourself"
            " in configure_model() (e.g. `torch.compile`, `checkpoint_wrapper` per block), or let"
            " the strategy parallelize the model (plan='auto', nothing parallelized in"
            " configure_model()).")
