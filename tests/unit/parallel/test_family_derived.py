"""Plans derived from a transformers model's ``base_model_tp_plan`` (lightning_tp/parallel/families/derived.py) for
classes no family covers, one test per outcome: fits (the Llama minimum), fits per projection (a warning naming the
extra collectives), does not fit (a typed error naming the modules). Meta-device models, no process group."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

from lightning_tp.errors import PlanError
from lightning_tp.parallel.families import family_of
from lightning_tp.parallel.families.derived import derive_plan
from lightning_tp.parallel.heads import HeadsColwise, HeadsRowwise, KVHeadsColwise
from lightning_tp.parallel.plans import resolve_plan
from lightning_tp.parallel.styles import HeadShardedNorm

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=128, head_dim=8, pad_token_id=0)


def meta_model(model_type: str, **extra) -> nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **extra})
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def resolve_quietly(model: nn.Module, sp: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fitting model resolves without a warning
        return resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=True)


@pytest.mark.parametrize("model_type", ["helium", "ernie4_5", "olmo", "cohere", "seed_oss"])
def test_fitting_model_gets_the_llama_minimum(model_type: str) -> None:
    model = meta_model(model_type)
    assert family_of(model) is None  # no named family: the plan is derived
    plan = resolve_quietly(model).styles
    layer = "model.layers.1"
    assert isinstance(plan["model.layers.0"], PrepareModuleInput)  # SP splits the sequence there
    attn, mlp = plan[f"{layer}.self_attn"], plan[f"{layer}.mlp"]
    assert attn.input_kwarg_layouts == {"hidden_states": Shard(1)}
    assert attn.desired_input_kwarg_layouts == {"hidden_states": Replicate()}
    assert mlp.input_layouts == (Shard(1),) and mlp.desired_input_layouts == (Replicate(),)
    assert type(plan[f"{layer}.self_attn.q_proj"]) is HeadsColwise
    assert plan[f"{layer}.self_attn.q_proj"].num_heads == 8
    assert type(plan[f"{layer}.self_attn.k_proj"]) is KVHeadsColwise
    assert plan[f"{layer}.self_attn.k_proj"].num_key_value_heads == 4
    assert type(plan[f"{layer}.self_attn.o_proj"]) is HeadsRowwise
    assert type(plan[f"{layer}.mlp.gate_proj"]) is ColwiseParallel
    assert plan[f"{layer}.mlp.down_proj"].output_layouts == (Shard(1),)
    norms = [p for p in plan if p.endswith("norm") or "layernorm" in p]
    assert all(isinstance(plan[p], SequenceParallel) for p in norms)
    assert norms or model_type == "olmo"  # OLMo's LayerNorms have no parameters: nothing to place
    # every parameter of the model is placed by the plan
    owners = {n.rpartition(".")[0] for n, _ in model.named_parameters()}
    assert owners <= set(plan)
    derived = derive_plan(model, sequence_parallel=True, loss_parallel=True)
    assert derived.minimum and derived.extras == []


def test_fitting_model_with_other_projection_names_and_biases() -> None:
    """Starcoder2: ``mlp.c_fc``/``c_proj``, biases on every projection (the output projection's bias keeps the plain
    torch styles, so the shape check refuses heads tp does not divide); Arcee: no gate_proj."""
    plan = resolve_quietly(meta_model("starcoder2")).styles
    assert type(plan["model.layers.0.mlp.c_fc"]) is ColwiseParallel
    assert type(plan["model.layers.0.mlp.c_proj"]) is RowwiseParallel
    assert type(plan["model.layers.0.self_attn.q_proj"]) is ColwiseParallel
    assert isinstance(plan["model.layers.0.input_layernorm"], SequenceParallel)
    arcee = resolve_quietly(meta_model("arcee"), sp=False).styles
    assert "model.layers.0.mlp.gate_proj" not in arcee and type(arcee["model.layers.0.mlp.up_proj"]) is ColwiseParallel
    assert arcee["model.layers.0.mlp.down_proj"].output_layouts == (Replicate(),)


def test_per_head_qk_norms_are_head_sharded() -> None:
    plan = resolve_quietly(meta_model("exaone4")).styles
    assert isinstance(plan["model.layers.0.self_attn.q_norm"], HeadShardedNorm)
    assert isinstance(plan["model.layers.0.post_feedforward_layernorm"], SequenceParallel)
    derived = derive_plan(meta_model("exaone4"), sequence_parallel=True, loss_parallel=True)
    assert derived.minimum and any("q_norm" in e for e in derived.extras)


def test_gathered_projections_get_the_per_projection_plan_and_a_warning() -> None:
    model = meta_model("glm")
    with pytest.warns(UserWarning, match=r"per-projection plan.*mlp\.gate_up_proj: 1 all-gather of its output"):
        plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True).styles
    gate_up, down = plan["model.layers.0.mlp.gate_up_proj"], plan["model.layers.0.mlp.down_proj"]
    assert type(gate_up) is ColwiseParallel and gate_up.output_layouts == (Replicate(),)
    assert down.input_layouts == (Replicate(),) and down.output_layouts == (Shard(1),)
    assert type(plan["model.layers.0.self_attn.q_proj"]) is HeadsColwise  # attention still at the minimum
    derived = derive_plan(model, sequence_parallel=True, loss_parallel=True)
    assert not derived.minimum
    assert derived.extras == ["mlp.gate_up_proj: 1 all-gather of its output (forward)",
                              "mlp.down_proj: 1 all-gather of its input gradient (backward)"]


def test_unplaced_parameters_refused() -> None:
    """Apertus' XIELU activation has parameters base_model_tp_plan does not place, inside a sharded MLP."""
    with pytest.raises(PlanError, match=r"model\.layers\.\*\.mlp\.act_fn \(parameters base_model_tp_plan does not"):
        resolve_plan(meta_model("apertus"), "auto", sequence_parallel=True, loss_parallel=True)


def test_expert_modules_refused() -> None:
    with pytest.raises(PlanError, match=r"mlp\.experts.*moe_tp_experts.*Pass `plan=` a dict"):
        resolve_plan(meta_model("minimax", num_local_experts=2), "auto", sequence_parallel=True, loss_parallel=True)


def test_no_tp_plan_refused() -> None:
    with pytest.raises(PlanError, match=r"StableLmForCausalLM and its config has no base_model_tp_plan"):
        resolve_plan(meta_model("stablelm"), "auto", sequence_parallel=False, loss_parallel=False)


def test_extra_module_in_the_decoder_layer_refused() -> None:
    model = meta_model("helium")
    for layer in model.model.layers:
        layer.gate = nn.Linear(64, 64, device="meta")  # not a norm: its place in the layer is unknown
    with pytest.raises(PlanError, match=r"model\.layers\.\*\.gate \(Linear: neither a norm over hidden=64"):
        resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)


def test_other_call_convention_refused() -> None:
    """The trace on the meta device sees an MLP called with a keyword argument."""
    model = meta_model("helium")
    for layer in model.model.layers:
        layer.forward = _keyword_mlp_forward(layer.mlp)
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp \(not called once with one positional tensor\)"):
        resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)


def _keyword_mlp_forward(mlp: nn.Module):
    def forward(hidden_states: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return hidden_states + mlp(x=hidden_states)

    return forward
