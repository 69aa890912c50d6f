"""Single-process tests of plan resolution (:mod:`lightning_tp.parallel.plans`) and the shape checks run before
sharding (:func:`lightning_tp.parallel.shapes.check_model_shapes`). Nothing here needs a process group."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
)

from lightning_tp.errors import ModelShapeError, PlanError
from lightning_tp.models import Llama, get_config
from lightning_tp.parallel.heads import HeadsColwise, HeadsRowwise, KVHeadsColwise
from lightning_tp.parallel.plans import (
    PLANS,
    ReplicateParallel,
    find_llama,
    llama_plan,
    per_projection_llama_plan,
    register_plan,
    resolve_plan,
)
from lightning_tp.parallel.shapes import attention_problems, check_model_shapes, vocab_ranks
from lightning_tp.parallel.styles import SequenceParallelNorm

LAYER_MODULES = {
    "input_layernorm": None,
    "self_attn": PrepareModuleInput,
    "self_attn.q_proj": HeadsColwise,  # split by whole heads; replicated when tp does not divide them
    "self_attn.k_proj": KVHeadsColwise,  # split by head, or replicated when tp cannot split them
    "self_attn.v_proj": KVHeadsColwise,
    "self_attn.o_proj": HeadsRowwise,
    "post_attention_layernorm": None,
    "mlp": PrepareModuleInput,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}


@pytest.fixture(scope="module")
def llama() -> Llama:
    with torch.device("meta"):
        return Llama(get_config("debug"))


class Wrapper(nn.Module):
    """Stands in for a LightningModule that holds the network as ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(4, 4)  # an unrelated extra module


def _expected_paths(prefix: str, num_layers: int) -> set[str]:
    paths = {f"{prefix}model.embed_tokens", f"{prefix}model.norm", f"{prefix}lm_head"}
    for i in range(num_layers):
        paths |= {f"{prefix}model.layers.{i}.{name}" for name in LAYER_MODULES}
    return paths


# ---------------------------------------------------------------------------------------------- auto plan


def test_auto_plan_resolves_exact_paths(llama: Llama) -> None:
    plan = resolve_plan(llama, "auto", sequence_parallel=True, loss_parallel=True)
    assert set(plan.styles) == _expected_paths("", 2) | {"model.layers.0"}  # SP: the sequence is split there
    assert "model.layers.1.self_attn.q_proj" in plan.styles
    assert not any("*" in path for path in plan.styles)
    assert plan.blocks == ["model.layers.0", "model.layers.1"]
    assert plan.roots == [""]
    for path in plan.styles:  # every path names a real module
        llama.get_submodule(path)


def test_auto_plan_inside_wrapper_gets_prefix(llama: Llama) -> None:
    wrapper = Wrapper(llama)
    plan = resolve_plan(wrapper, "auto", sequence_parallel=True, loss_parallel=True)
    assert set(plan.styles) == _expected_paths("model.", 2) | {"model.model.layers.0"}
    assert "model.model.layers.1.self_attn.q_proj" in plan.styles
    assert "head" not in plan.styles
    assert plan.blocks == ["model.model.layers.0", "model.model.layers.1"]
    assert plan.roots == ["model"]
    assert find_llama(wrapper) == ["model"]


def test_two_llamas_in_one_module_both_resolve() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with torch.device("meta"):
                self.student = Llama(get_config("debug"))
                self.teacher = Llama(get_config("debug", num_hidden_layers=3))

    plan = resolve_plan(Two(), "auto", sequence_parallel=False, loss_parallel=False)
    assert plan.roots == ["student", "teacher"]
    assert set(plan.styles) == _expected_paths("student.", 2) | _expected_paths("teacher.", 3)
    assert plan.blocks == [f"student.model.layers.{i}" for i in range(2)] + [
        f"teacher.model.layers.{i}" for i in range(3)
    ]


@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no_sp"])
def test_style_types_and_layouts_follow_sequence_parallel(llama: Llama, sequence_parallel: bool) -> None:
    plan = resolve_plan(llama, "auto", sequence_parallel=sequence_parallel, loss_parallel=True)
    norm_type = SequenceParallelNorm if sequence_parallel else ReplicateParallel
    between = Shard(1) if sequence_parallel else Replicate()
    for i in range(2):
        for name, style_type in LAYER_MODULES.items():
            style = plan.styles[f"model.layers.{i}.{name}"]
            assert type(style) is (style_type or norm_type), name
        attn = plan.styles[f"model.layers.{i}.self_attn"]
        assert attn.input_kwarg_layouts == {"hidden_states": between}
        assert attn.desired_input_kwarg_layouts == {"hidden_states": Replicate()}
        mlp = plan.styles[f"model.layers.{i}.mlp"]
        assert mlp.input_layouts == (between,) and mlp.desired_input_layouts == (Replicate(),)
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            assert plan.styles[f"model.layers.{i}.{proj}"].output_layouts == (between,)
    assert type(plan.styles["model.norm"]) is norm_type
    embed = plan.styles["model.embed_tokens"]
    assert type(embed) is RowwiseParallel
    # The embedding output stays whole; with SP the first block's input is split (a local slice).
    assert embed.input_layouts == (Replicate(),) and embed.output_layouts == (Replicate(),)
    assert plan.styles["lm_head"].input_layouts == (between,)
    if sequence_parallel:
        entry = plan.styles["model.layers.0"]
        assert entry.input_layouts == (Replicate(),) and entry.desired_input_layouts == (Shard(1),)
    else:
        assert "model.layers.0" not in plan.styles


@pytest.mark.parametrize("loss_parallel", [True, False], ids=["loss_parallel", "gathered"])
def test_lm_head_follows_loss_parallel(llama: Llama, loss_parallel: bool) -> None:
    plan = resolve_plan(llama, "auto", sequence_parallel=True, loss_parallel=loss_parallel)
    head = plan.styles["lm_head"]
    assert type(head) is ColwiseParallel
    if loss_parallel:
        assert head.output_layouts == (Shard(-1),)
        assert head.use_local_output is False
    else:
        assert head.output_layouts == (Replicate(),)
        assert head.use_local_output is True


def test_registered_plan_name_resolves(llama: Llama) -> None:
    plan = resolve_plan(llama, "llama_per_projection", sequence_parallel=False, loss_parallel=False)
    assert set(plan.styles) == _expected_paths("", 2) - {"model.layers.0.self_attn", "model.layers.0.mlp",
                                                         "model.layers.1.self_attn", "model.layers.1.mlp"}
    assert type(plan.styles["model.layers.0.input_layernorm"]) is ReplicateParallel
    with pytest.raises(PlanError, match="sequence_parallel=False"):
        resolve_plan(llama, "llama_per_projection", sequence_parallel=True, loss_parallel=False)


def test_plan_functions_are_fresh_each_call() -> None:
    a, b = llama_plan(), llama_plan()
    assert a.keys() == b.keys()
    assert a["lm_head"] is not b["lm_head"]
    assert per_projection_llama_plan().keys() <= a.keys()


# ---------------------------------------------------------------------------------------------- errors


def test_dict_plan_typo_names_pattern_and_near_miss(llama: Llama) -> None:
    with pytest.raises(PlanError) as info:
        resolve_plan(llama, {"model.layers.*.self_attn.q_prj": ColwiseParallel()}, sequence_parallel=False,
                     loss_parallel=False)
    message = str(info.value)
    assert "model.layers.*.self_attn.q_prj" in message
    assert "Near misses" in message and "self_attn.q_proj" in message


def test_dict_plan_typo_inside_wrapper_mentions_full_path(llama: Llama) -> None:
    with pytest.raises(PlanError) as info:
        resolve_plan(Wrapper(llama), {"model.lm_haed": ColwiseParallel()}, sequence_parallel=False,
                     loss_parallel=False)
    assert "model.lm_haed" in str(info.value) and "model.lm_head" in str(info.value)


def test_dict_plan_resolves_relative_to_module(llama: Llama) -> None:
    wrapper = Wrapper(llama)
    plan = resolve_plan(wrapper, {"model.model.layers.*.mlp.up_proj": ColwiseParallel(), "head": RowwiseParallel()},
                        sequence_parallel=False, loss_parallel=False)
    assert set(plan.styles) == {"model.model.layers.0.mlp.up_proj", "model.model.layers.1.mlp.up_proj", "head"}
    assert plan.roots == ["model"]
    assert plan.blocks == ["model.model.layers.0", "model.model.layers.1"]


def test_star_matches_one_path_component(llama: Llama) -> None:
    # "model.*.q_proj" would match "model.layers.0.self_attn.q_proj" under plain fnmatch; here `*` is one level
    with pytest.raises(PlanError, match="matches no module"):
        resolve_plan(llama, {"model.*.q_proj": ColwiseParallel()}, sequence_parallel=False, loss_parallel=False)


def test_unknown_plan_name_lists_registered(llama: Llama) -> None:
    with pytest.raises(PlanError) as info:
        resolve_plan(llama, "lama", sequence_parallel=True, loss_parallel=True)
    message = str(info.value)
    assert "'lama'" in message
    for name in ["auto", *PLANS]:
        assert name in message
    assert "Did you mean 'llama'" in message


def test_non_parallel_style_value_is_rejected(llama: Llama) -> None:
    with pytest.raises(PlanError) as info:
        resolve_plan(llama, {"lm_head": "colwise"}, sequence_parallel=False, loss_parallel=False)
    assert "lm_head" in str(info.value) and "ParallelStyle" in str(info.value)


def test_auto_plan_without_llama_mentions_plan_argument() -> None:
    module = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(PlanError) as info:
        resolve_plan(module, "auto", sequence_parallel=True, loss_parallel=True)
    assert "plan=" in str(info.value) and "Sequential" in str(info.value)
    with pytest.raises(PlanError, match="plan="):
        resolve_plan(module, "llama", sequence_parallel=True, loss_parallel=True)


def test_invalid_plan_type_is_rejected(llama: Llama) -> None:
    with pytest.raises(PlanError, match="42"):
        resolve_plan(llama, 42, sequence_parallel=True, loss_parallel=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- callables, registry


def test_callable_plan_gets_flags_and_resolves(llama: Llama) -> None:
    calls = []

    def plan_fn(*, sequence_parallel: bool, loss_parallel: bool) -> dict:
        calls.append((sequence_parallel, loss_parallel))
        return {"model.layers.*.mlp.gate_proj": ColwiseParallel(), "lm_head": ColwiseParallel()}

    plan = resolve_plan(llama, plan_fn, sequence_parallel=True, loss_parallel=False)
    assert calls == [(True, False)]
    assert set(plan.styles) == {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj", "lm_head"}
    assert plan.roots == [""]
    assert plan.blocks == ["model.layers.0", "model.layers.1"]


def test_callable_plan_must_return_dict(llama: Llama) -> None:
    with pytest.raises(PlanError, match="must return a dict"):
        resolve_plan(llama, lambda **_: [ColwiseParallel()], sequence_parallel=True, loss_parallel=True)


def test_register_plan_refuses_duplicates_without_override(llama: Llama) -> None:
    name = "test_plans_only_lm_head"

    def only_head(*, sequence_parallel: bool, loss_parallel: bool) -> dict:
        return {"lm_head": ColwiseParallel(use_local_output=not loss_parallel)}

    def only_embed(*, sequence_parallel: bool, loss_parallel: bool) -> dict:
        return {"model.embed_tokens": RowwiseParallel()}

    assert name not in PLANS
    try:
        register_plan(name, only_head)
        assert PLANS[name] is only_head
        assert set(resolve_plan(llama, name, sequence_parallel=False, loss_parallel=True).styles) == {"lm_head"}
        with pytest.raises(ValueError, match=name):
            register_plan(name, only_embed)
        assert PLANS[name] is only_head
        with pytest.raises(ValueError, match="llama"):
            register_plan("llama", only_embed)
        assert PLANS["llama"] is llama_plan
        register_plan(name, only_embed, override=True)
        assert set(resolve_plan(llama, name, sequence_parallel=False, loss_parallel=True).styles) == {
            "model.embed_tokens"
        }
    finally:
        PLANS.pop(name, None)


# ---------------------------------------------------------------------------------------------- shape checks


def test_check_model_shapes_kv_heads() -> None:
    with torch.device("meta"):
        model = Llama(get_config("debug"))  # 8 heads, 4 kv heads, intermediate 192, vocab 512
        odd = Llama(get_config("debug", num_attention_heads=24, num_key_value_heads=6, head_dim=8))
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    for tp in (1, 2, 4, 8):  # 8 > 4 KV heads: replicated (lightning_tp.parallel.kv_heads)
        check_model_shapes(model, plan, tp)
    odd_plan = resolve_plan(odd, "auto", sequence_parallel=True, loss_parallel=True)
    for tp in (2, 4, 8):  # 6 KV heads at tp 4 and 8: one copy per local query head
        check_model_shapes(odd, odd_plan, tp)


def test_a_plan_without_kv_replication_keeps_refusing_fewer_kv_heads_than_tp() -> None:
    with torch.device("meta"):
        model = Llama(get_config("debug"))
    plan = resolve_plan(model, "llama_per_projection", sequence_parallel=False, loss_parallel=False)
    with pytest.raises(ModelShapeError, match="num_key_value_heads=4 .* tensor_parallel_size=8"):
        check_model_shapes(model, plan, 8)


def test_a_vocabulary_tp_does_not_divide_is_split_unevenly() -> None:
    for vocab, tp in ((510, 4), (259, 2), (259, 8), (32001, 8)):  # 128,128,127,127 / 130,129 / ...
        with torch.device("meta"):
            model = Wrapper(Llama(get_config("debug", vocab_size=vocab)))
        plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
        check_model_shapes(model, plan, tp)
        assert vocab_ranks(vocab, tp) == tp
        per_projection = resolve_plan(model, "llama_per_projection", sequence_parallel=False,
                                      loss_parallel=False)
        check_model_shapes(model, per_projection, min(tp, 4))  # it needs tp to divide the 4 KV heads


def test_a_vocabulary_that_leaves_a_rank_without_rows_is_refused() -> None:
    # 9 rows at tp 8: torch.chunk gives 2,2,2,2,1 and three empty shards; at tp 5 every rank has one
    assert [vocab_ranks(9, tp) for tp in (4, 5, 6, 7, 8, 9)] == [3, 5, 5, 5, 5, 9]
    with torch.device("meta"):
        model = Wrapper(Llama(get_config("debug", vocab_size=6)))
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    check_model_shapes(model, plan, 2)
    with pytest.raises(ModelShapeError) as info:  # 6 rows at tp 4: 2,2,2 and an empty shard
        check_model_shapes(model, plan, 4)
    message = str(info.value)
    assert "vocab_size=6" in message and "1 of the tensor_parallel_size=4 ranks" in message
    assert "such as 3" in message
    assert "num_key_value_heads" not in message


def test_check_model_shapes_lists_every_problem() -> None:
    with torch.device("meta"):
        model = Llama(get_config("debug", num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                 intermediate_size=90, vocab_size=502))
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    with pytest.raises(ModelShapeError) as info:
        check_model_shapes(model, plan, 4)
    message = str(info.value)
    assert "intermediate_size=90" in message and "vocab_size" not in message  # 502: 126,126,125,125
    assert "num_attention_heads" not in message and "num_key_value_heads" not in message  # 6 / 3 heads: uneven


def test_auto_plan_accepts_supported_transformers_models_and_refuses_others() -> None:
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
        qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small, head_dim=8))
    assert "model.layers.0.self_attn.q_proj" in resolve_plan(llama, "auto", sequence_parallel=True,
                                                             loss_parallel=True).styles
    qwen_styles = resolve_plan(qwen3, "auto", sequence_parallel=True, loss_parallel=True).styles
    assert type(qwen_styles["model.layers.0.self_attn.q_norm"]).__name__ == "HeadShardedNorm"

    class MyLlama(transformers.LlamaForCausalLM):  # a user's subclass of a supported class is accepted
        pass

    with torch.device("meta"):
        mine = MyLlama(transformers.LlamaConfig(**small))
        gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(**small, head_dim=8))
        stablelm = transformers.StableLmForCausalLM(transformers.StableLmConfig(**small))
    assert resolve_plan(mine, "auto", sequence_parallel=False, loss_parallel=False).styles
    # Gemma has a family of its own under "auto", but the named Llama plan does not take it
    assert resolve_plan(gemma, "auto", sequence_parallel=True, loss_parallel=True).styles
    with pytest.raises(PlanError, match="GemmaForCausalLM.*plan="):
        resolve_plan(gemma, "llama", sequence_parallel=True, loss_parallel=True)
    # StableLM looks like Llama from the outside (model.layers[i].self_attn/mlp, lm_head), but no family covers it
    # and it has no tp plan to derive one from: refused, not guessed
    with pytest.raises(PlanError, match="StableLmForCausalLM"):
        resolve_plan(stablelm, "auto", sequence_parallel=True, loss_parallel=True)


def test_more_tp_ranks_than_query_heads_says_so() -> None:
    with torch.device("meta"):
        model = Llama(get_config("debug", num_attention_heads=4, num_key_value_heads=4, head_dim=16))
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    with pytest.raises(ModelShapeError, match="num_attention_heads=4 .*tensor_parallel_size=8, and fewer than it:"
                                              " each rank needs at least one whole query head"):
        check_model_shapes(model, plan, 8)


def test_an_attention_that_cannot_take_its_rank_head_layout_is_named() -> None:
    """Where tp selects heads per rank (9 query / 3 KV heads at tp 4), an attention keeping a head count, or without
    the num_key_value_groups the rank's repeat count goes into, is refused; an even split (tp 3) needs neither."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=72, intermediate_size=32, num_hidden_layers=2, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=8)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    assert attention_problems(model, plan, 4) == []  # transformers' own attention: shapes and num_key_value_groups
    del model.model.layers[1].self_attn.num_key_value_groups
    (problem,) = attention_problems(model, plan, 4)
    assert problem.startswith("model.layers.1.self_attn (LlamaAttention) cannot take 9 query and 3 KV heads")
    assert "no num_key_value_groups" in problem and "(1, 3)" in problem
    assert attention_problems(model, plan, 3) == []
    with pytest.raises(ModelShapeError, match="no num_key_value_groups"):
        check_model_shapes(model, plan, 4)
