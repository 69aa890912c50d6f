"""Tensor-parallel plans as data: a dict from module-path glob to a ``ParallelStyle``, and their
resolution against a LightningModule's concrete modules.

``plan="auto"`` finds every causal LM inside the module (``model.layers[i].self_attn``/``.mlp`` and
``lm_head``) and asks its family (:mod:`lightning_tp.parallel.families`) for the plan; the Llama
family's reaches the Megatron communication minimum per decoder layer
(:mod:`lightning_tp.parallel.families.llama`). Registered plans (:data:`PLANS`) apply one plan
function to every model found. Giving each projection a plain tensor instead (as in the
per-projection plan below) reduces the input gradient once per projection: 3 times for q/k/v,
twice for gate/up.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lightning_tp.errors import ModelNotRecognisedError, PlanError
from lightning_tp.parallel.families import FAMILIES, Family, family_of
from lightning_tp.parallel.families.base import transformers_classes
from lightning_tp.parallel.families.derived import derived_family
from lightning_tp.parallel.families.llama import LLAMA, llama_plan
from lightning_tp.parallel.heads import (
    SPLIT_BY_HEAD,
    HeadsColwise,
    HeadsRowwise,
    KVHeadsColwise,
    head_layout,
    shown_style,
)
from lightning_tp.parallel.styles import HeadShardedNorm, ReplicateParallel

__all__ = [
    "PLANS",
    "SUPPORTED_TRANSFORMERS",
    "HeadShardedNorm",
    "PlanFn",
    "ReplicateParallel",
    "ResolvedPlan",
    "describe_plan",
    "find_llama",
    "llama_plan",
    "per_projection_llama_plan",
    "register_plan",
    "resolve_plan",
    "tp_shard_dim",
]

PlanFn = Callable[..., dict[str, ParallelStyle]]
"""``plan(*, sequence_parallel: bool, loss_parallel: bool) -> {glob: style}``, globs relative to the
model."""
PlanSpec = Union[str, Mapping[str, ParallelStyle], PlanFn]


def per_projection_llama_plan(
    *, sequence_parallel: bool = False, loss_parallel: bool = False
) -> dict[str, ParallelStyle]:
    """The plan found in tutorials and Hugging Face ``tp_plan``: each projection sharded on its own.

    Kept as a baseline for benchmarks and tests: same forward communication as :func:`llama_plan`
    without SP, but 3 + 2 input-gradient all-reduces per layer in backward instead of 2.
    """
    if sequence_parallel:
        raise PlanError("`per_projection_llama_plan` is a TP-only baseline; "
                        "pass sequence_parallel=False.")
    plan: dict[str, ParallelStyle] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel),
    }
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "mlp.gate_proj", "mlp.up_proj"):
        plan[f"model.layers.*.{proj}"] = ColwiseParallel()
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        plan[f"model.layers.*.{proj}"] = RowwiseParallel()
    for norm in ("model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm",
                 "model.norm"):
        plan[norm] = ReplicateParallel()
    return plan


PLANS: dict[str, PlanFn] = {"llama": llama_plan, "llama_per_projection": per_projection_llama_plan}
"""Named plans; ``"llama"`` resolves through the Llama family (the model's head counts included)."""


def register_plan(name: str, fn: PlanFn, *, override: bool = False) -> None:
    """Make ``TensorParallelStrategy(plan=name)`` use ``fn``."""
    if name in PLANS and not override:
        raise ValueError(f"A plan named {name!r} is already registered; "
                         "pass override=True to replace it.")
    PLANS[name] = fn


@dataclass
class ResolvedPlan:
    """A plan matched against concrete modules of one LightningModule."""

    styles: dict[str, ParallelStyle]
    """Exact module path (from the LightningModule) → style."""
    blocks: list[str] = field(default_factory=list)
    """Module paths that get their own FSDP unit (the decoder blocks)."""
    roots: list[str] = field(default_factory=list)
    """Model roots: each gets the last FSDP unit and, if it has one, ``init_weights()``."""
    grid: Optional[tuple[int, int]] = None
    """``(r, c)`` for a 2D plan (:mod:`lightning_tp.parallel.grid`): its grid styles apply over the
    ``(tp_row, tp_col)`` mesh, the others over the flattened one."""


def _is_llama(module: nn.Module) -> bool:
    inner = getattr(module, "model", None)
    layers = getattr(inner, "layers", None)
    head = getattr(module, "lm_head", None)
    head = getattr(head, "base_layer", head)  # a PEFT LoRA layer wraps it
    if not isinstance(head, nn.Linear) or not isinstance(layers, nn.ModuleList):
        return False
    return len(layers) > 0 and all(hasattr(layer, "self_attn") and hasattr(layer, "mlp")
                                   for layer in layers)


def find_llama(root: nn.Module) -> list[str]:
    """Paths of the outermost Llama-like causal LMs (``model.layers[*].self_attn/mlp`` +
    ``lm_head``)."""
    found: list[str] = []
    for name, module in root.named_modules():
        if any(name == f or name.startswith(f + ".") for f in found):
            continue
        if _is_llama(module):
            found.append(name)
    return found


SUPPORTED_TRANSFORMERS = LLAMA.classes
"""transformers classes the Llama plan is known to fit (checked by tests against single-process
runs); ``plan="auto"`` covers every family of :data:`~lightning_tp.parallel.families.FAMILIES`."""


def _family(model: nn.Module, path: str, plan: str) -> Family:
    """The family whose plan ``plan`` applies to ``model``: its own under ``"auto"``, the Llama
    family's under a registered name; under ``"auto"`` a transformers class no family covers gets
    a plan derived from its ``base_model_tp_plan`` (:mod:`~.families.derived`, which raises
    :class:`PlanError` when that cannot be exact); :class:`PlanError` for one under a name."""
    family = family_of(model)
    covered = [f for f in FAMILIES.values() if plan == "auto" or f is LLAMA]
    if family in covered:
        return family
    if plan == "auto" and family is None and transformers_classes(model):
        return derived_family(model)
    if transformers_classes(model) or family is not None:
        classes = ", ".join(c for f in covered for c in f.classes)
        raise PlanError(
            f"plan={plan!r} found transformers' {type(model).__name__} at {path or '<root>'!r}; it"
            f" resembles Llama but only {classes} are known to match"
            f" {'a family plan' if plan == 'auto' else 'the plan'}. Pass `plan=` a dict"
            " {module glob: ParallelStyle} written for it."
        )
    return LLAMA  # a Llama-shaped model of the user's own


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _match(
    patterns: Mapping[str, ParallelStyle], names: list[str], prefix: str
) -> dict[str, ParallelStyle]:
    styles: dict[str, ParallelStyle] = {}
    for pattern, style in patterns.items():
        if not isinstance(style, ParallelStyle):
            raise PlanError(
                f"Plan entry {pattern!r} maps to {type(style).__name__}, not a"
                " torch.distributed.tensor.parallel ParallelStyle (e.g. ColwiseParallel())."
            )
        full = _join(prefix, pattern)
        hits = [n for n in names
                if fnmatch.fnmatchcase(n, full) and n.count(".") == full.count(".")]
        if not hits:
            near = difflib.get_close_matches(full, names, n=5, cutoff=0.6)
            raise PlanError(
                f"Plan pattern {full!r} matches no module."
                + (f" Near misses: {', '.join(near)}." if near else "")
                + (" Patterns are module paths from `named_modules()`; `*` matches one path"
                   " component.")
            )
        for hit in hits:
            styles[hit] = style
    return styles


def resolve_plan(
    module: nn.Module, plan: PlanSpec, *, sequence_parallel: bool, loss_parallel: bool,
    grid: Optional[tuple[int, int]] = None,
) -> ResolvedPlan:
    """Match ``plan`` against ``module`` (usually the LightningModule) and return exact paths.

    ``"auto"`` and registered names apply to every Llama-like model found inside ``module``; a dict
    or callable result is matched relative to ``module`` itself. With a ``grid``, ``"auto"`` (or
    ``"llama"``) gives the 2D plan of :mod:`lightning_tp.parallel.grid`; raises :class:`PlanError`
    for anything else or for a model it cannot split.
    """
    names = [n for n, _ in module.named_modules() if n]
    if grid is not None:
        return _resolve_grid_plan(module, plan, names, grid, loss_parallel)
    if isinstance(plan, str):
        if plan != "auto" and plan not in PLANS:
            near = difflib.get_close_matches(plan, PLANS, n=3)
            raise PlanError(
                f"Unknown plan {plan!r}. Registered plans: {', '.join(['auto', *PLANS])}."
                + (f" Did you mean {near[0]!r}?" if near else "")
                + " Or pass a dict {module glob: ParallelStyle} or a callable."
            )
        roots = find_llama(module)
        if not roots:
            raise ModelNotRecognisedError(
                f"plan={plan!r} found no model it recognises in {type(module).__name__}: it looks"
                " for a Llama-family causal LM (`model.layers[i].self_attn`, `.mlp`, `lm_head`, as"
                " in lightning_tp.models.Llama or transformers' LlamaForCausalLM). Build the model"
                " in `__init__` or `configure_model()`, pass `plan=` a dict"
                " {module glob: ParallelStyle} or a callable, or pass plan=None and parallelize it"
                " yourself in configure_model()."
            )
        families = {root: _family(module.get_submodule(root), root, plan) for root in roots}
        fn = None if plan in ("auto", "llama") else PLANS[plan]
        styles: dict[str, ParallelStyle] = {}
        blocks: list[str] = []
        for root in roots:
            modes: dict[str, Any] = {"sequence_parallel": sequence_parallel,
                                     "loss_parallel": loss_parallel}
            patterns = (fn(**modes) if fn is not None
                        else families[root].plan(module.get_submodule(root), **modes))
            styles.update(_match(patterns, names, root))
            layers = _join(root, "model.layers")
            blocks += [n for n in names
                       if n.startswith(layers + ".") and n.count(".") == layers.count(".") + 1]
        return ResolvedPlan(styles=styles, blocks=blocks, roots=roots)

    if callable(plan) and not isinstance(plan, Mapping):
        patterns = plan(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
        if not isinstance(patterns, Mapping):
            raise PlanError(f"The plan callable {plan!r} must return a dict"
                            f" {{module glob: ParallelStyle}}, got {type(patterns).__name__}.")
    elif isinstance(plan, Mapping):
        patterns = plan
    else:
        raise PlanError("`plan` must be 'auto', a registered name, a dict or a callable; "
                        f"got {plan!r}.")
    styles = _match(patterns, names, "")
    roots = find_llama(module)
    blocks = []
    for child_name, child in module.named_modules():
        if isinstance(child, nn.ModuleList):
            blocks += [_join(child_name, str(i)) for i, m in enumerate(child)
                       if any(True for _ in m.parameters())]
    return ResolvedPlan(styles=styles, blocks=blocks, roots=roots)


def _resolve_grid_plan(module: nn.Module, plan: PlanSpec, names: list[str],
                       grid: tuple[int, int], loss_parallel: bool) -> ResolvedPlan:
    from lightning_tp.parallel.grid import grid_llama_plan, grid_model_problems

    if plan not in ("auto", "llama"):
        raise PlanError(f"tensor_parallel_size={grid} (2D) applies its own plan; got plan={plan!r}."
                        " Fix: plan='auto', or an int tensor_parallel_size to use this plan in 1D.")
    roots = find_llama(module)
    if not roots:
        raise ModelNotRecognisedError(
            f"tensor_parallel_size={grid} (2D) found no Llama-family causal LM in"
            f" {type(module).__name__} (`model.layers[i].self_attn`, `.mlp`, `lm_head`). Build the"
            " model in `__init__` or `configure_model()`, or use an int tensor_parallel_size.")
    problems = grid_model_problems(module, roots, grid)
    if problems:
        raise PlanError("Cannot apply 2D tensor parallelism: " + "; ".join(problems) + ".")
    styles: dict[str, ParallelStyle] = {}
    blocks: list[str] = []
    for root in roots:
        styles.update(_match(grid_llama_plan(loss_parallel=loss_parallel), names, root))
        layers = _join(root, "model.layers")
        blocks += [n for n in names
                   if n.startswith(layers + ".") and n.count(".") == layers.count(".") + 1]
    return ResolvedPlan(styles=styles, blocks=blocks, roots=roots, grid=grid)


def tp_shard_dim(style: Any, module: nn.Module, param_ndim: int,
                 tp: int | None = None, name: str | None = None) -> int | None:
    """The dimension of a parameter that a tensor-parallel ``style`` shards over ``tp`` ranks, or
    None if replicated.

    ``ColwiseParallel`` shards a Linear's weight and bias on dim 0 and an Embedding's weight on dim
    1 (the head-aware styles of :mod:`lightning_tp.parallel.heads` too, unless their heads do not
    split evenly over ``tp``: then they replicate);
    ``RowwiseParallel`` shards a Linear's weight on dim 1 (its bias is replicated) and an
    Embedding's weight on dim 0; a style with its own ``shard_dim(name, param_ndim)`` (the experts
    of :mod:`lightning_tp.parallel.experts`) says it per parameter ``name``; any other style
    (``SequenceParallel``, :class:`ReplicateParallel`) replicates.
    """
    embedding = isinstance(module, nn.Embedding)
    if hasattr(style, "shard_dim") and name is not None:
        return style.shard_dim(name, param_ndim)
    if isinstance(style, (HeadsColwise, KVHeadsColwise, HeadsRowwise)) and tp is not None:
        layout = head_layout(style.num_heads or style.num_key_value_heads,
                             getattr(style, "num_key_value_heads", style.num_heads), tp)
        if layout.kv_replicated if isinstance(style, KVHeadsColwise) else layout.q_replicated:
            return None
    if isinstance(style, ColwiseParallel):
        return 0 if param_ndim == 1 else (1 if embedding else 0)
    if isinstance(style, RowwiseParallel):
        return None if param_ndim == 1 else (0 if embedding else 1)
    return None


def describe_plan(module: nn.Module, plan: ResolvedPlan, tp: int) -> list[dict[str, Any]]:
    """One row per planned module: its path, style, layouts and each parameter's global and
    per-rank shape.

    Computed from the styles, without a process group, so a notebook can show the plan before
    training.
    """
    from lightning_tp.parallel.grid import grid_local_shape
    from lightning_tp.parallel.lora import LoraColwise, LoraRowwise, adapt_styles, sub_styles

    rows = []
    styles = plan.styles if plan.grid is not None else adapt_styles(module, plan.styles)
    for path, style in styles.items():
        target = module.get_submodule(path)
        # a PEFT LoRA layer: its base and adapters, each split as the style says
        owners = (sub_styles(style, target) if isinstance(style, (LoraColwise, LoraRowwise))
                  else {"": style})
        params = {}
        for owner_path, owner_style in owners.items():
            owner = target.get_submodule(owner_path)
            for name, param in owner.named_parameters(recurse=False):
                local = list(param.shape)
                dim = (None if owner_style is None
                       else tp_shard_dim(owner_style, owner, param.ndim, tp, name))
                if dim is not None:
                    local[dim] = -(-local[dim] // tp)
                if plan.grid is not None:  # a grid style splits on both dims of (r, c)
                    local = list(grid_local_shape(owner_style, name, tuple(param.shape), plan.grid)
                                 or local)
                params[_join(owner_path, name)] = (tuple(param.shape), tuple(local))
        lora = "" not in owners
        base = style.base if lora else style
        layouts = {k: v for k, v in vars(base).items() if "layout" in k and v}
        shown = type(base).__name__
        if shown in SPLIT_BY_HEAD:
            config = next((getattr(module.get_submodule(root), "config", None)
                           for root in plan.roots if path.startswith(root)), None)
            if config is not None:
                shown = shown_style(shown, head_layout(config.num_attention_heads,
                                                       config.num_key_value_heads, tp))[0]
        rows.append({"module": path, "style": f"LoRA on {shown}" if lora else shown,
                     "params": params, "layouts": {k: str(v) for k, v in layouts.items()}})
    return rows
