"""The Phi-3 family (transformers' ``Phi3ForCausalLM``: Phi-3-mini 32/32 heads, Phi-3-medium
40/10, Phi-3.5-mini and Phi-4-mini 24/8) at the Llama communication minimum per decoder layer.

What it needs beyond Llama: Phi-3 fuses ``self_attn.qkv_proj`` (rows ``[q | k | v]``) and
``mlp.gate_up_proj`` (rows ``[gate | up]``). transformers' own tp_plan gathers their outputs
(``colwise_gather_output``: one all-gather per projection forward, attention not parallel). Here
both are :class:`~lightning_tp.parallel.fused.FusedColwise`: each rank holds whole KV groups of
``qkv_proj`` (its query heads, their key and value heads) and matching rows of gate and up, and
reorders its shard locally so ``chunk(2, dim=-1)`` and the q/k/v slices find its own parts.
Extra collectives per layer: none (forward and backward as Llama's, TP and TP + SP).

``Phi3Attention`` slices ``qkv`` at ``config.num_attention_heads * head_dim`` and
``self.num_key_value_heads * head_dim``, counts from the config, not from the tensor. After
sharding, each attention module therefore sees its rank's counts: ``num_key_value_heads`` and a
view of the config with ``num_attention_heads`` per rank (every other field read through to the
shared config, which is left alone). The rest of the forward infers heads from shapes.

Refused before spawn (``shape_problems``: this plan has no head-selecting styles): a tp that does
not divide both head counts (no KV-head replication for a fused ``qkv_proj``) or
``intermediate_size``. Checkpoints hold the fused weights in the grouped row order of
:mod:`~lightning_tp.parallel.fused` (tp-independent; :func:`~lightning_tp.parallel.fused.
restore_fused_rows` gives the original order).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInput

from lightning_tp.parallel.families.base import Family, register_family
from lightning_tp.parallel.families.llama import llama_plan
from lightning_tp.parallel.fused import FusedColwise, FusedHeadsColwise
from lightning_tp.parallel.heads import head_layout, rank_heads

__all__ = ["PHI3", "LocalHeadsAttention", "phi3_plan"]


class _LocalHeadsConfig:
    """A model config as one attention module on one rank sees it: ``num_attention_heads`` per
    rank, everything else (attention implementation, sliding window, ...) the shared config's."""

    def __init__(self, config: Any, num_attention_heads: int) -> None:
        object.__setattr__(self, "_shared", config)
        object.__setattr__(self, "num_attention_heads", num_attention_heads)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._shared, name, value)


class LocalHeadsAttention(PrepareModuleInput):
    """``PrepareModuleInput`` on an attention module that also gives it its rank's head counts
    (``num_key_value_heads``, and ``config.num_attention_heads`` through a per-module view), for
    attention code that slices a fused projection by config counts."""

    def __init__(self, num_attention_heads: int, num_key_value_heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp = device_mesh.size()
        q, kv = self.num_attention_heads, self.num_key_value_heads
        if head_layout(q, kv, tp).kv_replicated:  # this rank's heads selected (FusedHeadsColwise)
            query, key_value = rank_heads(q, kv, tp, device_mesh.get_local_rank())
            local_q, local_kv = len(query), len(key_value)
        else:  # split by whole KV groups
            local_q, local_kv = q // tp, kv // tp
        module = super()._apply(module, device_mesh)
        module.num_key_value_heads = local_kv
        module.num_key_value_groups = local_q // local_kv
        module.config = _LocalHeadsConfig(module.config, local_q)
        return module


def phi3_plan(model: nn.Module, *, sequence_parallel: bool, loss_parallel: bool,
              **_: Any) -> dict[str, ParallelStyle]:
    """The Llama plan with Phi-3's fused projections split by whole KV groups and gate/up rows."""
    config = model.config
    q, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q
    width = config.intermediate_size
    plan = llama_plan(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel,
                      num_attention_heads=q, num_key_value_heads=kv)  # o_proj: HeadsRowwise
    attention = plan.pop("model.layers.*.self_attn")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                 "mlp.up_proj"):
        del plan[f"model.layers.*.{name}"]
    plan["model.layers.*.self_attn"] = LocalHeadsAttention(
        q, kv, input_kwarg_layouts=attention.input_kwarg_layouts,
        desired_input_kwarg_layouts=attention.desired_input_kwarg_layouts)
    # One unit per KV group: its q // kv query heads, its key head, its value head.
    plan["model.layers.*.self_attn.qkv_proj"] = FusedHeadsColwise(q, kv, head_dim)
    plan["model.layers.*.mlp.gate_up_proj"] = FusedColwise(
        (width, width), width, what="mlp.gate_up_proj")
    return plan


_UNITS = ("self_attn.qkv_proj is split by whole KV groups, or replicated with each rank's heads"
          " selected")
PHI3 = register_family(Family(
    "phi3", ("Phi3ForCausalLM",), phi3_plan,
    extras="with KV heads or query heads tp does not divide: one all-reduce of the qkv_proj weight"
           " gradient per layer in backward, one more for o_proj when the query heads are uneven",
    sharded_dims=(("num_attention_heads", f"query heads ({_UNITS})"),
                  ("num_key_value_heads", f"key/value heads ({_UNITS})"),
                  ("intermediate_size", "MLP width (mlp.gate_up_proj and mlp.down_proj are split"
                                        " along it)"))))
