"""What the Llama plan requires of a model's shapes: the MLP width divisible by the TP degree, at
least one whole query head and one vocabulary row per rank, and under sequence parallelism a
sequence length the TP ranks can split. Checked before anything is sharded.

A vocabulary tp does not divide is split unevenly (DTensor's ``torch.chunk`` rule: every rank holds
``ceil(vocab / tp)`` rows but the last ones, which hold fewer), so there are no padding rows to
mask: the loss, the checkpoint and the export see exactly the model's vocabulary. The price is
the imbalance of the largest shard, ``ceil(vocab / tp)`` rows against ``vocab / tp``."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from lightning_tp.errors import ModelShapeError, SequenceLengthError
from lightning_tp.parallel.families.base import family_of
from lightning_tp.parallel.fused import FusedHeadsColwise
from lightning_tp.parallel.heads import KVHeadsColwise
from lightning_tp.parallel.plans import ResolvedPlan

__all__ = ["attention_problems", "check_model_shapes", "install_sequence_check", "shape_problems",
           "vocab_ranks"]

# (config attribute, what it sizes) for every dimension the Llama plan shards over tp.
_SHARDED_DIMS = (
    ("num_attention_heads", "query heads (q_proj/o_proj are split by whole heads)"),
    ("num_key_value_heads", "key/value heads (k_proj/v_proj are split by head)"),
    ("intermediate_size", "MLP width (gate/up/down are split along it)"),
)


def shape_problems(config: Any, tp: int, head_aware: bool = True,
                   dims: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """One message per dimension of a model ``config`` that the Llama plan cannot split over
    ``tp``. With ``head_aware`` (the Llama plan's styles of :mod:`lightning_tp.parallel.heads`),
    query and KV heads that tp does not divide are fine, as long as every rank gets at least one
    whole query head. ``dims`` (a family's ``sharded_dims``) replaces the Llama plan's
    dimensions and what they size."""
    problems = []
    for attr, what in dims or _SHARDED_DIMS:
        value = getattr(config, attr, None)
        if not isinstance(value, int):
            continue
        if head_aware and attr == "num_key_value_heads":
            continue  # split, replicated or one copy per query head: every layout works
        if head_aware and attr == "num_attention_heads" and value >= tp:
            continue  # whole heads per rank, as evenly as possible
        if value % tp != 0:
            fix = f"choose a tensor_parallel_size that divides {value}"
            fewer = (", and fewer than it: each rank needs at least one whole query head"
                     if attr == "num_attention_heads" and value < tp else "")
            if head_aware and attr == "num_attention_heads":
                fix = f"choose a tensor_parallel_size of at most {value}"
            problems.append(f"{attr}={value} ({what}) is not divisible by"
                            f" tensor_parallel_size={tp}{fewer}: {fix}")
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab_ranks(vocab, tp) < tp:
        problems.append(f"vocab_size={vocab} (vocabulary: embed_tokens/lm_head are split along it,"
                        f" {math.ceil(vocab / tp)} per rank) leaves"
                        f" {tp - vocab_ranks(vocab, tp)} of the tensor_parallel_size={tp} ranks"
                        f" without a row: choose a tensor_parallel_size at which every rank"
                        f" holds one, such as {_most_ranks(vocab, tp)}")
    return problems


def vocab_ranks(vocab: int, tp: int) -> int:
    """How many of ``tp`` ranks hold at least one row of a ``vocab``-row table split unevenly
    (``torch.chunk``: ``ceil(vocab / tp)`` rows per rank until the rows run out)."""
    return math.ceil(vocab / math.ceil(vocab / tp))


def _most_ranks(vocab: int, tp: int) -> int:
    """The largest tp up to ``tp`` at which every rank holds a row of ``vocab``."""
    return max(t for t in range(1, tp + 1) if vocab_ranks(vocab, t) == t)


# Head counts an attention module may keep as attributes: each rank computes other counts than
# these when its heads are selected (the native Llama and transformers' attention read theirs from
# the projections' shapes and `num_key_value_groups`, which `heads.localize_kv_groups` sets).
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
                     "n_heads", "n_kv_heads", "n_local_heads", "n_local_kv_heads")


def attention_problems(module: nn.Module, plan: ResolvedPlan, tp: int) -> list[str]:
    """One message per attention module whose heads ``tp`` would select per rank (KV heads
    replicated, or uneven query heads) but which cannot take that layout: it keeps a head count as
    an attribute, or repeats KV heads without the ``num_key_value_groups`` this rank's layout sets.
    An even split by head needs neither and is not checked."""
    found: dict[tuple[str, int, int, str], list[str]] = {}  # (class, q, kv, why) -> module paths
    for path, style in plan.styles.items():
        if not isinstance(style, KVHeadsColwise) or not path.endswith(".k_proj"):
            continue
        kv = style.num_key_value_heads
        q = style.num_heads if style.num_heads is not None else kv
        if tp > q or (q % tp == 0 and kv % tp == 0):
            continue  # refused by shape_problems / split evenly
        attention = module.get_submodule(path.rpartition(".")[0])
        kept = [f"{a}={getattr(attention, a)}" for a in _HEAD_COUNT_ATTRS
                if isinstance(getattr(attention, a, None), int)]
        native = type(attention).__module__ == "lightning_tp.models.llama"
        groups = native or hasattr(attention, "num_key_value_groups")
        if kept or not groups:
            why = (f"it keeps {', '.join(kept)}" if kept
                   else "it has no num_key_value_groups to give the rank's KV-head repeat count")
            found.setdefault((type(attention).__name__, q, kv, why), []).append(
                path.rpartition(".")[0])
    return [f"{paths[0]}{f' and {len(paths) - 1} more' if len(paths) > 1 else ''} ({cls}) cannot"
            f" take {q} query and {kv} KV heads at tensor_parallel_size={tp}, where each rank"
            f" computes only its own heads: {why}. Fix: choose a tensor_parallel_size that divides"
            f" both {q} and {kv} ({_divisors(q, kv)}), or have the attention infer its head counts"
            f" from the projections' shapes (view(..., -1, head_dim))"
            for (cls, q, kv, why), paths in found.items()]


def _divisors(a: int, b: int) -> str:
    return ", ".join(str(d) for d in range(1, min(a, b) + 1) if a % d == 0 and b % d == 0)


def check_model_shapes(module: nn.Module, plan: ResolvedPlan, tp: int) -> None:
    """Raise one :class:`ModelShapeError` listing every dimension of every model root not
    divisible by ``tp`` and every attention module that cannot take its head layout."""
    if tp == 1:
        return
    problems = []
    head_aware = any(isinstance(style, (KVHeadsColwise, FusedHeadsColwise))
                     for style in plan.styles.values())
    for root in plan.roots:
        model = module.get_submodule(root)
        config = getattr(model, "config", None)
        family = family_of(model)
        if config is not None:
            problems += shape_problems(config, tp, head_aware,
                                       family.sharded_dims if family else ())
    if not problems:
        problems = attention_problems(module, plan, tp)
    if problems:
        raise ModelShapeError("Cannot shard the model: " + "; ".join(problems) + ".")


def install_sequence_check(module: nn.Module, plan: ResolvedPlan, tp: int,
                           what: str | None = None) -> None:
    """Under sequence parallelism, reject at each model root's input a sequence length the ``tp``
    ranks cannot split (on every rank, before any collective could hang on it). ``what`` names
    ``tp`` in the message when it is not the TP size (a 2D grid's rows)."""
    what = what or f"tensor_parallel_size={tp}"
    fix = (", or pass sequence_parallel=False" if plan.grid is None
           else ", or use an int tensor_parallel_size (1D) with sequence_parallel=False")

    def check(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, Tensor) and ids.ndim >= 2 and ids.shape[1] % tp != 0:
            raise SequenceLengthError(
                f"Sequence length {ids.shape[1]} is not divisible by {what},"
                f" which sequence parallelism requires. Fix: pad or pack sequences to a multiple of"
                f" {tp}{fix}."
            )

    for path in plan.roots:
        module.get_submodule(path).register_forward_pre_hook(check, with_kwargs=True, prepend=True)
