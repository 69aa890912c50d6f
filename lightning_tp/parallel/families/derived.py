"""A plan for a transformers causal LM no family covers, derived from the model's own
``base_model_tp_plan`` (transformers' per-projection mapping, ``"colwise"``, ``"rowwise"``, ...)
and its module structure.

Three outcomes, never a silent guess:

* **Fits** (Helium, Ernie 4.5, Arcee, Nemotron, OLMo v1, Starcoder2, Cohere, Seed-OSS, Exaone 4,
  ...): every projection of ``self_attn`` and ``mlp`` is ``"colwise"`` or ``"rowwise"`` (one
  rowwise output projection per sublayer), per-head q/k norms are the only other parameters in
  attention, the decoder layer holds only norms over ``hidden`` besides the two sublayers and
  calls them as Llama does (attention with ``hidden_states=``, the MLP positionally). The plan is
  the Llama family's minimum (:func:`~lightning_tp.parallel.families.llama.llama_plan`): one
  replicated input and one input-gradient reduction per sublayer, SP on every norm, head-aware
  q/k/v/o. Parallel attention + MLP blocks (Cohere, Phi) and norms after the sublayers (Exaone 4)
  cost nothing more: every activation outside the sublayers stays in the between-blocks layout.
  Per-head q/k norms (:class:`~lightning_tp.parallel.styles.HeadShardedNorm`, as Qwen3's) add
  the reduction of their ``head_dim``-element weight gradient over the TP ranks.
* **Fits per projection** (GLM's fused ``gate_up_proj``, OLMo 2's full-width q/k norms, Phi-3's
  fused ``qkv_proj``): a sublayer whose projections are ``"colwise_gather_output"`` /
  ``"rowwise_split_input"`` keeps transformers' layout inside the sublayer (the gathered tensors are
  whole on every rank, its other parameters replicated, its core computed on every rank), behind
  the same ``PrepareModuleInput`` boundary, so SP and loss parallel still hold. Extra per decoder
  layer: one all-gather of each gathered projection's output (forward) and one all-gather of each
  split projection's input gradient (backward). A warning on rank 0 names them.
* **Does not fit**: anything else (fused or expert modules, plan values with no exact translation,
  parameters the plan does not place, other modules in the decoder layer, other call conventions)
  raises :class:`~lightning_tp.errors.PlanError` naming the modules; the fix is ``plan=`` a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
)

from lightning_tp.errors import PlanError
from lightning_tp.parallel.families.base import Family
from lightning_tp.parallel.families.llama import head_counts, llama_plan
from lightning_tp.parallel.styles import HeadShardedNorm, ReplicateParallel, SequenceParallelNorm

__all__ = ["DerivedPlan", "derive_plan", "derived_family"]

_COL, _ROW = ("colwise", "colwise_gather_output"), ("rowwise", "rowwise_split_input")
_PER_HEAD = "replicated_with_grad_allreduce"
_KNOWN = (*_COL, *_ROW, _PER_HEAD)
_SUBLAYERS = ("self_attn", "mlp")
_PASSIVE = (nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class DerivedPlan:
    """What :func:`derive_plan` found for one model."""

    patterns: dict[str, ParallelStyle]
    """The plan, globs relative to the causal LM."""
    minimum: bool
    """True: the Llama minimum per layer (plus ``extras`` of per-head norms, if any)."""
    extras: list[str] = field(default_factory=list)
    """Collectives per decoder layer beyond the Llama minimum, one phrase each."""

    @property
    def summary(self) -> str:
        kind = "minimum-communication plan" if self.minimum else "per-projection plan"
        more = "; ".join(self.extras) if self.extras else "none"
        return f"{kind} derived from base_model_tp_plan; extra collectives per layer: {more}"


def _has_params(module: nn.Module, recurse: bool = True) -> bool:
    return next(module.parameters(recurse=recurse), None) is not None


def _is_norm(module: nn.Module, hidden: int) -> bool:
    """A per-token norm over ``hidden``: a norm class whose parameters are ``(hidden,)`` vectors."""
    named = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")
    params = list(module.parameters())
    return named and all(p.shape == (hidden,) for p in params)


def _tp_plan(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise PlanError(
            f"plan='auto': no family covers {type(model).__name__} and its config has no"
            " base_model_tp_plan to derive a plan from. Pass `plan=` a dict"
            " {module glob: ParallelStyle} written for it.")
    return dict(plan)


def _sublayer_entries(tp_plan: dict[str, str], problems: list[str]) -> dict[str, dict[str, str]]:
    """``{"self_attn": {"q_proj": "colwise", ...}, "mlp": {...}}``; entries that are not one
    projection of a sublayer become problems (top-level entries are the Llama plan's own)."""
    out: dict[str, dict[str, str]] = {s: {} for s in _SUBLAYERS}
    for key, value in tp_plan.items():
        parts = key.split(".")
        if parts[:2] != ["layers", "*"]:
            continue  # embed_tokens / norm: the Llama plan places them
        if len(parts) != 4 or parts[2] not in _SUBLAYERS:
            problems.append(f"model.{key} ({value!r}: not one projection of self_attn or mlp)")
        elif value not in _KNOWN:
            problems.append(f"model.{key} ({value!r}: no exact translation to a torch style)")
        else:
            out[parts[2]][parts[3]] = value
    return out


def _trace(model: nn.Module) -> dict[str, Any]:
    """How decoder layer 0 calls its sublayers, from a forward on the meta device (no memory)."""
    if any(p.device.type != "meta" for p in model.parameters()):
        with torch.device("meta"):
            model = type(model)(model.config)
    seen: dict[str, Any] = {}
    layer = model.get_submodule("model.layers.0")

    def record(name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            seen.setdefault(name, []).append((tensors, kwargs))
        return hook

    hooks = [layer.register_forward_pre_hook(record("layer"), with_kwargs=True)]
    for name, module in layer.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(record(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except Exception as e:  # noqa: BLE001 - any failure means the structure cannot be checked
        seen["error"] = f"{type(e).__name__}: {e}"
    finally:
        for h in hooks:
            h.remove()
    return seen


def _call_problems(seen: dict[str, Any], per_head: list[str], head_dim: int) -> list[str]:
    if "error" in seen:
        return [f"a forward on the meta device to check how the layers call their sublayers"
                f" failed ({seen['error'][:200]})"]
    problems = []
    layer = seen.get("layer", [([], {})])[0]
    if len(layer[0]) < 1:
        problems.append("model.layers.0 (its hidden states are not its first positional argument,"
                        " where sequence parallelism splits them)")
    attn, mlp = seen.get("self_attn", []), seen.get("mlp", [])
    if len(attn) != 1 or attn[0][0] or not isinstance(attn[0][1].get("hidden_states"),
                                                       torch.Tensor):
        problems.append("model.layers.0.self_attn (not called once with `hidden_states=` and no"
                        " positional tensor)")
    if len(mlp) != 1 or len(mlp[0][0]) != 1 or any(isinstance(v, torch.Tensor)
                                                    for v in mlp[0][1].values()):
        problems.append("model.layers.0.mlp (not called once with one positional tensor)")
    for name in per_head:
        calls = seen.get(f"self_attn.{name}", [])
        x = calls[0][0][0] if calls and calls[0][0] else None
        if x is None or x.ndim != 4 or x.shape[-1] != head_dim:
            problems.append(f"model.layers.0.self_attn.{name} (not a norm over each head's"
                            f" head_dim={head_dim} of a (batch, ., ., head_dim) tensor)")
    return problems


def derive_plan(model: nn.Module, *, sequence_parallel: bool, loss_parallel: bool,
                **_: Any) -> DerivedPlan:
    """The plan for ``model`` (a transformers causal LM), or :class:`PlanError` naming every module
    that does not fit (see the module docstring for the three outcomes)."""
    config, cls = model.config, type(model).__name__
    hidden = config.hidden_size
    problems: list[str] = []
    entries = _sublayer_entries(_tp_plan(model), problems)
    layers = model.get_submodule("model.layers")
    if len({type(layer) for layer in layers}) != 1:
        problems.append("model.layers (decoder layers of more than one class)")
    layer = layers[0]
    between = Shard(1) if sequence_parallel else Replicate()
    norm_style = (SequenceParallelNorm(use_local_output=True) if sequence_parallel
                  else ReplicateParallel())
    counts = head_counts(model)
    head_dim = getattr(config, "head_dim", None) or hidden // counts.get("num_attention_heads", 1)
    base = llama_plan(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel, **counts)
    plan = {k: v for k, v in base.items()
            if k in ("model.embed_tokens", "lm_head", "model.layers.0", "model.layers.*.self_attn",
                     "model.layers.*.mlp")}
    extras: list[str] = []
    gathered = []
    per_head: list[str] = []
    for sub in _SUBLAYERS:
        module, found = layer.get_submodule(sub), entries[sub]
        projections = {n: v for n, v in found.items() if v != _PER_HEAD}
        rows = [n for n, v in projections.items() if v in _ROW]
        gather = {v in ("colwise_gather_output", "rowwise_split_input")
                  for v in projections.values()}
        if len(rows) != 1 or len(projections) < 2 or len(gather) != 1:
            problems.append(f"model.layers.*.{sub} (base_model_tp_plan {found}: needs colwise"
                            " projections and one rowwise output projection, all plain or all"
                            " gathered/split)")
            continue
        # a PEFT LoRA layer wraps its projection as `base_layer`
        missing = [n for n in projections
                   if not isinstance(getattr(getattr(module, n, None), "base_layer",
                                             getattr(module, n, None)), nn.Linear)]
        missing += [n for n in found if n not in projections and not hasattr(module, n)]
        if missing:
            problems += [f"model.layers.*.{sub}.{n} (not an nn.Linear of {sub})" for n in missing]
            continue
        glob = f"model.layers.*.{sub}"
        if gather == {True}:
            gathered.append(sub)
            for name, value in projections.items():
                plan[f"{glob}.{name}"] = (ColwiseParallel(output_layouts=Replicate())
                                          if value in _COL else
                                          RowwiseParallel(input_layouts=Replicate(),
                                                          output_layouts=between))
                extras.append(f"{sub}.{name}: 1 all-gather of its output (forward)" if value in _COL
                              else f"{sub}.{name}: 1 all-gather of its input gradient (backward)")
            for name, child in module.named_modules():
                if (name and name not in projections and name.split(".")[0] not in projections
                        and _has_params(child, recurse=False)):
                    plan[f"{glob}.{name}"] = ReplicateParallel()  # its input is whole on every rank
            continue
        qkv = {"q_proj", "k_proj", "v_proj"}
        out = module.get_submodule(rows[0])
        head_aware = (sub == "self_attn" and set(projections) - set(rows) == qkv
                      and len(counts) == 2 and getattr(out, "bias", None) is None
                      and module.q_proj.out_features == counts["num_attention_heads"] * head_dim
                      and module.k_proj.out_features == counts["num_key_value_heads"] * head_dim)
        for name in projections:
            if head_aware:  # the Llama plan's head-aware q/k/v/o
                source = name if name in qkv else "o_proj"
                plan[f"{glob}.{name}"] = base[f"model.layers.*.self_attn.{source}"]
            elif name in rows:
                plan[f"{glob}.{name}"] = RowwiseParallel(output_layouts=between)
            else:
                plan[f"{glob}.{name}"] = ColwiseParallel()
        for name, value in found.items():
            if value == _PER_HEAD:
                if sub != "self_attn" or not _is_norm(module.get_submodule(name), head_dim):
                    problems.append(f"{glob}.{name} ({value!r}: only per-head q/k norms of"
                                    " attention have an exact translation)")
                per_head.append(name)
                plan[f"{glob}.{name}"] = HeadShardedNorm()
                extras.append(f"self_attn.{name}: its head_dim weight gradient summed over TP")
        loose = [n for n, child in module.named_modules()
                 if n and n not in found and _has_params(child, recurse=False)
                 and n.split(".")[0] not in found]  # a PEFT LoRA layer's base and adapters
        problems += [f"{glob}.{n} (parameters base_model_tp_plan does not place, inside a"
                     f" sublayer whose projections are sharded)" for n in loose]
    for name, child in layer.named_children():
        if name in _SUBLAYERS:
            continue
        if _is_norm(child, hidden):
            if _has_params(child):
                plan[f"model.layers.*.{name}"] = norm_style
        elif not isinstance(child, _PASSIVE):
            problems.append(f"model.layers.*.{name} ({type(child).__name__}: neither a norm over"
                            f" hidden={hidden} nor a sublayer)")
    inner = model.get_submodule("model")
    for name, child in inner.named_children():
        if name in ("embed_tokens", "layers") or not _has_params(child):
            continue
        if _is_norm(child, hidden):
            plan[f"model.{name}"] = norm_style
        else:
            problems.append(f"model.{name} ({type(child).__name__}: parameters outside the"
                            " layers that are neither the embedding, a final norm nor lm_head)")
    if not isinstance(model.get_submodule("model.embed_tokens"), nn.Embedding):
        problems.append("model.embed_tokens (not an nn.Embedding)")
    if not problems:
        problems = _call_problems(_trace(model), per_head, head_dim)
    if problems:
        raise PlanError(
            f"plan='auto': no family covers {cls}, and a plan derived from its"
            f" base_model_tp_plan would not be exact: {'; '.join(problems)}. Pass `plan=` a dict"
            " {module glob: ParallelStyle} written for it (lightning_tp.parallel.plans.llama_plan"
            " is a starting point), or add a family (lightning_tp.parallel.families).")
    return DerivedPlan(plan, minimum=not gathered, extras=extras)


def _plan_with_warning(model: nn.Module, *, sequence_parallel: bool, loss_parallel: bool,
                       **_: Any) -> dict[str, ParallelStyle]:
    derived = derive_plan(model, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    if not derived.minimum:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"plan='auto' on {type(model).__name__}: {derived.summary}. Pass `plan=` a"
                       " dict to choose another layout.", category=UserWarning)
    return derived.patterns


def derived_family(model: nn.Module) -> Family:
    """A family of one class, ``model``'s, whose plan is :func:`derive_plan` (a warning on rank 0
    names the extra collectives of a per-projection plan)."""
    return Family("derived", (type(model).__name__,), _plan_with_warning)

