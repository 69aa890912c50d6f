"""``finetune peft=lora``: the ``peft`` group's settings checked in the launching process, before
any rank is spawned, and turned into :class:`~lightning_tp.training.module.CausalLMModule`'s
``lora=`` argument.

Each check names the key (``peft.rank``, ``peft.target_modules``, ``checkpoint``, ``resume``), the
value and the fix: a method other than ``none``/``lora``, a rank that is not positive or is wider
than a targeted projection, a target that names no module, a target the plan cannot shard with
adapters beside it (``lm_head``, ``embed_tokens``, norms), a start from a checkpoint that holds
adapters only, a resume from a checkpoint of other adapters or another base, and PEFT not
installed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_tp.checkpoint.weights import saved_layout
from lightning_tp.errors import CheckpointError, PlanError
from lightning_tp.models import Llama, LlamaConfig
from lightning_tp.recipes.config import LORA_TARGETS, RecipeConfigError, peft_problems
from lightning_tp.training.module import import_peft

__all__ = ["PEFT_METHODS", "check_lora_plan", "check_lora_targets", "check_resume",
           "describe", "lora_settings"]

PEFT_METHODS = ("none", "lora")
"""The values of ``peft.method`` (the options of the ``peft`` config group)."""

_EXAMPLE = f"peft.target_modules=[{','.join(LORA_TARGETS)}]"


def lora_settings(peft: DictConfig | Mapping[str, Any],
                  checkpoint: str | None = None) -> dict[str, Any] | None:
    """The ``lora=`` argument of :class:`~lightning_tp.training.module.CausalLMModule` for the
    ``peft`` group (``None`` for ``peft=none``), its values checked; ``base`` is the resolved
    ``checkpoint`` path the base weights come from (None: random init).

    Raises :class:`RecipeConfigError` for an unknown method or an out-of-range value (every such
    problem in one message), and
    :class:`~lightning_tp.errors.UnsupportedFeatureError` when PEFT is not installed.
    """
    values = OmegaConf.to_container(peft) if isinstance(peft, DictConfig) else dict(peft)
    method = values.get("method", "none")
    if method not in PEFT_METHODS:
        close = difflib.get_close_matches(str(method), PEFT_METHODS, n=1)
        hint = f" (did you mean peft={close[0]}?)" if close else ""
        raise RecipeConfigError(f"peft.method={method!r} is not one of {list(PEFT_METHODS)}{hint}."
                                " Fix: peft=lora for LoRA adapters, or peft=none to train every"
                                " weight.")
    if method == "none":
        return None
    rank, alpha, dropout = values.get("rank"), values.get("alpha"), values.get("dropout")
    targets = values.get("target_modules")
    problems = peft_problems(rank, dropout, targets, alpha=alpha)
    if problems:
        raise RecipeConfigError("; ".join(problems) + ". Fix: set those keys as shown.")
    import_peft("peft=lora")
    return {"rank": rank, "alpha": float(alpha), "dropout": float(dropout),
            "target_modules": list(targets),
            "base": None if checkpoint is None else str(Path(checkpoint).resolve())}


def _matches(path: str, target: str) -> bool:
    """PEFT's rule for a name in ``target_modules``: the module's path is it or ends with it."""
    return path == target or path.endswith("." + target)


def check_lora_targets(config: LlamaConfig, lora: Mapping[str, Any]) -> None:
    """Every name in ``lora["target_modules"]`` names at least one projection (``nn.Linear``) of the
    Llama ``config`` describes, at least ``lora["rank"]`` wide both ways. Builds the model on the
    meta device (no memory).

    Raises :class:`RecipeConfigError` (a name matching nothing, a rank too wide; every problem in
    one message) or :class:`~lightning_tp.errors.PlanError` (a name matching a module that is not a
    projection, e.g. a norm or the embedding).
    """
    with torch.device("meta"):
        model = Llama(config)
    modules = dict(model.named_modules())
    # what can carry adapters: the decoder layers' projections (lm_head is refused by the plan)
    projections = sorted({p.rpartition(".")[2] for p, m in modules.items()
                          if isinstance(m, nn.Linear) and ".layers." in f".{p}"})
    targets, rank = list(lora["target_modules"]), int(lora["rank"])
    unmatched, narrow, not_linear = [], {}, {}
    for target in targets:
        found = {p: m for p, m in modules.items() if p and _matches(p, target)}
        if not found:
            unmatched.append(target)
            continue
        for module in found.values():
            if not isinstance(module, nn.Linear):
                not_linear.setdefault(target, type(module).__name__)
            elif rank > min(module.in_features, module.out_features):
                narrow.setdefault(target, (module.in_features, module.out_features))
    problems = []
    if unmatched:
        shown = []
        for target in unmatched:
            close = difflib.get_close_matches(target, projections, n=2, cutoff=0.5)
            shown.append(repr(target) + (f" (did you mean {' or '.join(map(repr, close))}?)"
                                         if close else ""))
        verb = "matches" if len(shown) == 1 else "match"
        problems.append(f"peft.target_modules: {', '.join(shown)} {verb} no module of the model,"
                        f" whose projections are {projections}. Fix: name projections, e.g."
                        f" {_EXAMPLE}.")
    if narrow:
        widest = min(min(dims) for dims in narrow.values())
        problems.append(f"peft.rank={rank} is larger than "
                        + ", ".join(f"{t} ({i} in, {o} out)" for t, (i, o) in narrow.items())
                        + "; a LoRA rank above min(in, out) adds parameters and no capacity."
                        f" Fix: peft.rank={widest} or less, or leave those out of"
                        " peft.target_modules.")
    if problems:
        raise RecipeConfigError(" ".join(problems))
    if not_linear:
        shown = ", ".join(f"{t!r} (a {kind})" for t, kind in not_linear.items())
        raise PlanError(
            f"peft.target_modules names {shown}: LoRA adapters can only sit beside a projection"
            " that the tensor-parallel plan splits (the attention and MLP projections). Fix:"
            f" remove {', '.join(map(repr, not_linear))} from peft.target_modules, e.g."
            f" {_EXAMPLE}.")


def check_lora_plan(module: nn.Module, strategy: Any, lora: Mapping[str, Any]) -> None:
    """The strategy's plan for ``module`` (its LoRA layers on the meta device) can shard every
    adapter beside its base (:func:`lightning_tp.parallel.lora.adapt_styles`): checked in the
    launching process at every tp, tp 1 included (where nothing is split), so a
    ``peft.target_modules`` that trains at one tp trains at all. Other plan problems are left to the
    strategy's own check. :class:`~lightning_tp.errors.PlanError` naming the targets to drop."""
    from lightning_tp.parallel.lora import adapt_styles, lora_layers, lora_style
    from lightning_tp.parallel.plans import resolve_plan

    try:
        styles = resolve_plan(module, strategy.plan, sequence_parallel=strategy.sequence_parallel,
                              loss_parallel=strategy.loss_parallel).styles
    except (PlanError, AttributeError):
        return  # not a plan this check can read: the strategy raises its own error before spawn
    try:
        adapt_styles(module, styles)
    except PlanError as error:
        refused = set()
        for path, layer in lora_layers(module).items():
            base = styles.get(f"{path}.base_layer") or styles.get(path)
            try:
                if base is None:
                    raise PlanError(path)
                lora_style(path, layer, base)
            except PlanError:
                refused.add(next((t for t in lora["target_modules"] if _matches(path, t)), path))
        names = ", ".join(map(repr, sorted(refused))) or "them"
        raise PlanError(f"peft.target_modules={list(lora['target_modules'])}: {error} In the"
                        f" recipe: remove {names} from peft.target_modules.") from error


def check_resume(resume: str | None, lora: Mapping[str, Any] | None) -> None:
    """A ``resume=`` checkpoint fits the run: LoRA adapters only when ``peft=lora`` (with the same
    rank, alpha and targets, trained on the same ``checkpoint=`` base), full weights when
    ``peft=none``. Reads ``meta.pt`` only; a checkpoint that records no layout is left to the load.
    :class:`~lightning_tp.errors.CheckpointError` naming the keys to change otherwise."""
    if resume is None:
        return
    layout = saved_layout(resume)
    if "adapters_only" not in layout:
        return
    adapters_only = bool(layout["adapters_only"])
    if lora is None and adapters_only:
        raise CheckpointError(f"resume={resume!r} holds LoRA adapters only, and this run trains"
                              " every weight (peft=none). Fix: resume it with peft=lora and the"
                              " settings it was trained with, or resume a full fine-tuning"
                              " checkpoint.")
    if lora is None:
        return
    if not adapters_only:
        raise CheckpointError(f"resume={resume!r} is a full fine-tuning checkpoint (no LoRA"
                              " adapters), and this run trains LoRA adapters (peft=lora). Fix:"
                              " resume it with peft=none, or start LoRA from it with"
                              f" checkpoint={resume!r} and resume=null.")
    saved = [c for adapters in (layout.get("peft") or {}).values() for c in adapters.values()]
    if len(saved) != 1:
        return
    (config,) = saved
    differ = []
    for key, theirs, ours in (("peft.rank", config.get("r"), lora["rank"]),
                              ("peft.alpha", config.get("lora_alpha"), lora["alpha"]),
                              ("peft.target_modules", sorted(config.get("target_modules") or []),
                               sorted(lora["target_modules"]))):
        if theirs != ours:
            differ.append(f"{key}={theirs} there, {ours} here")
    base = config.get("base_model_name_or_path")
    if base != lora["base"]:
        differ.append(f"checkpoint={base} there (the base weights), {lora['base']} here")
    if differ:
        raise CheckpointError(f"resume={resume!r} holds other LoRA adapters than this run builds: "
                              + "; ".join(differ) + ". Fix: set those keys to the checkpoint's"
                              " values.")


def describe(lora: Mapping[str, Any], counts: Mapping[str, int]) -> str:
    """One line: the adapters and how many of the model's parameters train."""
    share = counts["trainable"] / counts["total"] if counts["total"] else 0.0
    return (f"[lightning-tp] LoRA rank {lora['rank']} (alpha {lora['alpha']:g}, dropout"
            f" {lora['dropout']:g}) on {', '.join(lora['target_modules'])}:"
            f" {counts['trainable']:,} of {counts['total']:,} parameters train ({share:.2%}); the"
            " base is frozen")
