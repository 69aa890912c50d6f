"""Tensor-parallel plans as data: a dict from module-path glob to a ``ParallelStyle``.

The Llama plan reaches the Megatron communication minimum per decoder layer and step:

* TP only: forward one all-reduce after ``o_proj`` and one after ``down_proj``; backward one
  all-reduce of the attention input gradient and one of the MLP input gradient.
* TP + SP: the all-reduces become an all-gather (before attention / MLP) and a reduce-scatter
  (after ``o_proj`` / ``down_proj``), forward and backward.

The trick that keeps the backward at one collective per module is ``PrepareModuleInput`` on
``self_attn`` and ``mlp``: the projections then receive a replicated DTensor, their input gradients
come back as ``Partial`` DTensors that autograd sums locally, and a single reduction runs at the
module boundary. Giving each projection a plain tensor instead (as in the per-projection plan
below) reduces the input gradient once per projection: 3 times for q/k/v, twice for gate/up.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_tp.errors import ModelNotRecognisedError, PlanError
from lightning_tp.parallel.heads import (
    SPLIT_BY_HEAD,
    HeadsColwise,
    HeadsRowwise,
    KVHeadsColwise,
    head_layout,
    shown_style,
)

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


def _replicate_parameters(_name: str, module: nn.Module, mesh: Any) -> None:
    """``distribute_module``'s partition function: every parameter of ``module`` a ``Replicate()``
    DTensor on ``mesh``."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))


class ReplicateParallel(ParallelStyle):
    """Keep a module's parameters whole on every TP rank, but as ``Replicate()`` DTensors.

    Costs no communication. It puts parameters that TP does not shard (norm weights when sequence
    parallelism is off) on the same mesh as the sharded ones, so after FSDP every parameter lives on
    one 2D mesh and foreach optimizers and norm computations see a single mesh.
    """

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import DTensor

        def inputs(_mod: nn.Module, args: tuple, mesh: Any) -> tuple:
            return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                         if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a
                         for a in args)

        def outputs(_mod: nn.Module, out: Any, _mesh: Any) -> Any:
            return out.to_local() if isinstance(out, DTensor) else out

        return distribute_module(module, device_mesh, _replicate_parameters, inputs, outputs)


class HeadShardedNorm(ParallelStyle):
    """A norm over ``head_dim`` applied to a rank's own heads (Qwen3's ``q_norm``/``k_norm``).

    Its input is the local ``(bs, seqlen, n_local_heads, head_dim)`` projection, i.e. ``Shard(2)``
    of the full heads; the weight is ``Replicate()`` so that its gradient, a partial sum over each
    rank's heads, is summed over the TP ranks (a plain weight would silently keep only the local
    heads' share).
    """

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import DTensor

        def inputs(_mod: nn.Module, args: tuple, mesh: Any) -> tuple:
            return (DTensor.from_local(args[0], mesh, [Shard(2)], run_check=False), *args[1:])

        def outputs(_mod: nn.Module, out: Any, _mesh: Any) -> Any:
            return out.to_local()

        return distribute_module(module, device_mesh, _replicate_parameters, inputs, outputs)


def llama_plan(
    *, sequence_parallel: bool = True, loss_parallel: bool = True, qk_norm: bool = False,
    num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
) -> dict[str, ParallelStyle]:
    """The minimum-communication plan for Llama-family models with Hugging Face module names.

    One plan serves the native Llama and transformers' Llama, Mistral, Qwen2 and (``qk_norm=True``)
    Qwen3. The embedding output stays whole and the sequence is split on entry to the first block (a
    local slice, no communication): Hugging Face models derive positions and the causal mask from
    the embedding output's length, which must be the full sequence. Cost against splitting in the
    embedding itself: one all-reduce instead of a reduce-scatter forward and one all-gather
    backward, per step, not per layer.
    """
    # Activations between blocks are sequence-sharded with SP and replicated without it.
    between = Shard(1) if sequence_parallel else Replicate()
    norm = SequenceParallel() if sequence_parallel else ReplicateParallel()
    # With the head counts, projections whose heads tp cannot split evenly are replicated and each
    # rank computes its own heads (lightning_tp.parallel.heads); without them, split by head.
    heads, kv_heads = num_attention_heads, num_key_value_heads
    q = ColwiseParallel() if heads is None else HeadsColwise(heads)
    kv = ColwiseParallel() if kv_heads is None else KVHeadsColwise(kv_heads, heads)
    o = (RowwiseParallel(output_layouts=between) if heads is None
         else HeadsRowwise(heads, output_layouts=between))
    plan: dict[str, ParallelStyle] = {
        "model.embed_tokens": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate()
        ),
        "model.layers.*.input_layernorm": norm,
        # Attention is called with keyword arguments (`hidden_states=`) by both implementations.
        "model.layers.*.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": between},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        ),
        "model.layers.*.self_attn.q_proj": q,
        # Split by head; replicated with per-rank head selection when tp exceeds the KV heads.
        "model.layers.*.self_attn.k_proj": kv,
        "model.layers.*.self_attn.v_proj": kv,
        "model.layers.*.self_attn.o_proj": o,
        "model.layers.*.post_attention_layernorm": norm,
        "model.layers.*.mlp": PrepareModuleInput(
            input_layouts=(between,), desired_input_layouts=(Replicate(),)
        ),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(output_layouts=between),
        "model.norm": norm,
        # Loss parallel keeps the logits vocab-sharded (a DTensor) so cross entropy never gathers
        # them; without it, the logits are all-gathered into a plain tensor.
        "lm_head": ColwiseParallel(
            input_layouts=between,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sequence_parallel:
        plan["model.layers.0"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
        )
    if qk_norm:
        plan["model.layers.*.self_attn.q_norm"] = HeadShardedNorm()
        plan["model.layers.*.self_attn.k_norm"] = HeadShardedNorm()
    return plan


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


def _is_llama(module: nn.Module) -> bool:
    inner = getattr(module, "model", None)
    layers = getattr(inner, "layers", None)
    if (not isinstance(getattr(module, "lm_head", None), nn.Linear)
            or not isinstance(layers, nn.ModuleList)):
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


SUPPORTED_TRANSFORMERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                          "Qwen3ForCausalLM")
"""transformers classes the Llama plan is known to fit (checked by tests against single-process
runs)."""


def _check_supported(model: nn.Module, path: str, plan: str) -> None:
    cls = type(model)
    from_transformers = [c for c in cls.__mro__ if c.__module__.startswith("transformers.")]
    if from_transformers and not any(c.__name__ in SUPPORTED_TRANSFORMERS
                                     for c in from_transformers):
        raise PlanError(
            f"plan={plan!r} found transformers' {cls.__name__} at {path or '<root>'!r}; it"
            f" resembles Llama but only {', '.join(SUPPORTED_TRANSFORMERS)} are known to match the"
            " plan. Pass `plan=` a dict {module glob: ParallelStyle} written for it."
        )


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
    module: nn.Module, plan: PlanSpec, *, sequence_parallel: bool, loss_parallel: bool
) -> ResolvedPlan:
    """Match ``plan`` against ``module`` (usually the LightningModule) and return exact paths.

    ``"auto"`` and registered names apply to every Llama-like model found inside ``module``; a dict
    or callable result is matched relative to ``module`` itself.
    """
    names = [n for n, _ in module.named_modules() if n]
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
        for root in roots:
            _check_supported(module.get_submodule(root), root, plan)
        fn = PLANS["llama" if plan == "auto" else plan]
        styles: dict[str, ParallelStyle] = {}
        blocks: list[str] = []
        for root in roots:
            kwargs: dict[str, Any] = {"sequence_parallel": sequence_parallel,
                                      "loss_parallel": loss_parallel}
            if fn is llama_plan:
                config = getattr(module.get_submodule(root), "config", None)
                for field_name in ("num_attention_heads", "num_key_value_heads"):
                    if isinstance(getattr(config, field_name, None), int):
                        kwargs[field_name] = getattr(config, field_name)
                kwargs["qk_norm"] = hasattr(
                    module.get_submodule(_join(root, "model.layers.0.self_attn")), "q_norm")
            styles.update(_match(fn(**kwargs), names, root))
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


def tp_shard_dim(style: Any, module: nn.Module, param_ndim: int,
                 tp: int | None = None) -> int | None:
    """The dimension of a parameter that a tensor-parallel ``style`` shards over ``tp`` ranks, or
    None if replicated.

    ``ColwiseParallel`` shards a Linear's weight and bias on dim 0 and an Embedding's weight on dim
    1 (the head-aware styles of :mod:`lightning_tp.parallel.heads` too, unless their heads do not
    split evenly over ``tp``: then they replicate);
    ``RowwiseParallel`` shards a Linear's weight on dim 1 (its bias is replicated) and an
    Embedding's weight on dim 0; any other style (``SequenceParallel``, :class:`ReplicateParallel`)
    replicates.
    """
    embedding = isinstance(module, nn.Embedding)
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
    rows = []
    for path, style in plan.styles.items():
        target = module.get_submodule(path)
        params = {}
        for name, param in target.named_parameters(recurse=False):
            local = list(param.shape)
            dim = tp_shard_dim(style, target, param.ndim, tp)
            if dim is not None:
                local[dim] = -(-local[dim] // tp)
            params[name] = (tuple(param.shape), tuple(local))
        layouts = {k: v for k, v in vars(style).items() if "layout" in k and v}
        shown = type(style).__name__
        if shown in SPLIT_BY_HEAD:
            config = next((getattr(module.get_submodule(root), "config", None)
                           for root in plan.roots if path.startswith(root)), None)
            if config is not None:
                shown = shown_style(shown, head_layout(config.num_attention_heads,
                                                       config.num_key_value_heads, tp))[0]
        rows.append({"module": path, "style": shown, "params": params,
                     "layouts": {k: str(v) for k, v in layouts.items()}})
    return rows
