"""The Granite and MoE families (:mod:`lightning_tp.parallel.families.granite`,
:mod:`~lightning_tp.parallel.families.moe`, :mod:`lightning_tp.parallel.experts`) in one process: the auto plan of
tiny meta-device Granite, Mixtral and Qwen3-MoE models and its styles per module, the typed refusals, the calling
conventions the plans rely on, and the whole plan applied on a 1-rank mesh against the unsharded model (the multi-rank
numerics are the family worker's)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
)

from lightning_tp.errors import ModelShapeError, PlanError
from lightning_tp.parallel.experts import ExpertsParallel, RouterParallel
from lightning_tp.parallel.families import family_of
from lightning_tp.parallel.families.granite import GRANITE
from lightning_tp.parallel.families.moe import MOE
from lightning_tp.parallel.heads import HeadsColwise, HeadsRowwise, KVHeadsColwise
from lightning_tp.parallel.plans import resolve_plan
from lightning_tp.parallel.styles import HeadShardedNorm, SequenceParallelNorm

transformers = pytest.importorskip("transformers")

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=64,
              attn_implementation="eager")
MULTIPLIERS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                   logits_scaling=8.0)


def build(kind: str, device: str = "meta", **extra) -> nn.Module:
    if kind == "granite":  # Granite-3's 4:1 heads, every multiplier away from 1
        config = transformers.GraniteConfig(**COMMON, intermediate_size=64, num_key_value_heads=2, **MULTIPLIERS)
        model_cls = transformers.GraniteForCausalLM
    elif kind == "mixtral":  # Mixtral-8x7B's 4:1 heads, 4 experts top-2
        config = transformers.MixtralConfig(**COMMON, intermediate_size=32, num_key_value_heads=2, head_dim=4,
                                            num_local_experts=4, num_experts_per_tok=2, **extra)
        model_cls = transformers.MixtralForCausalLM
    else:  # Qwen3-30B-A3B's 8:1 heads, head_dim != hidden / heads, q/k norms
        config = transformers.Qwen3MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=32,
                                             num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                             norm_topk_prob=True, **extra)
        model_cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        return model_cls(config)


ATTENTION = {
    "input_layernorm": SequenceParallelNorm,
    "self_attn": PrepareModuleInput,
    "self_attn.q_proj": HeadsColwise,
    "self_attn.k_proj": KVHeadsColwise,
    "self_attn.v_proj": KVHeadsColwise,
    "self_attn.o_proj": HeadsRowwise,
    "post_attention_layernorm": SequenceParallelNorm,
}
DENSE = {"mlp": PrepareModuleInput, "mlp.gate_proj": ColwiseParallel, "mlp.up_proj": ColwiseParallel,
         "mlp.down_proj": RowwiseParallel}
SPARSE = {"mlp": PrepareModuleInputOutput, "mlp.gate": RouterParallel, "mlp.experts": ExpertsParallel}
QK_NORMS = {"self_attn.q_norm": HeadShardedNorm, "self_attn.k_norm": HeadShardedNorm}


def _expect(plan, layers: list[dict]) -> None:
    expected = {f"model.layers.{i}.{name}" for i, layer in enumerate(layers) for name in layer}
    assert set(plan.styles) == expected | {"model.embed_tokens", "model.norm", "lm_head", "model.layers.0"}
    for i, layer in enumerate(layers):
        for name, style_type in layer.items():
            assert type(plan.styles[f"model.layers.{i}.{name}"]) is style_type, (i, name)


@pytest.mark.parametrize("kind", ["granite", "mixtral", "qwen3moe"])
def test_auto_plan_covers_every_module_with_its_style(kind: str) -> None:
    model = build(kind)
    assert family_of(model) is (GRANITE if kind == "granite" else MOE)
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    layer = {**ATTENTION, **(DENSE if kind == "granite" else SPARSE), **(QK_NORMS if kind == "qwen3moe" else {})}
    _expect(plan, [layer, layer])
    kv = model.config.num_key_value_heads
    assert plan.styles["model.layers.1.self_attn.k_proj"].num_key_value_heads == kv
    assert plan.styles["lm_head"].output_layouts == (Shard(-1),)
    if kind != "granite":  # one gather in, the combined partial sums reduced once out, to the SP layout
        block = plan.styles["model.layers.1.mlp"]
        assert block.prepare_module_input.input_layouts == (Shard(1),)
        assert block.prepare_module_input.desired_input_layouts == (Replicate(),)
        assert block.prepare_module_output.output_layouts == (Partial(),)
        assert block.prepare_module_output.desired_output_layouts == (Shard(1),)


def test_without_sequence_parallel_the_moe_block_reduces_to_replicated() -> None:
    plan = resolve_plan(build("mixtral"), "auto", sequence_parallel=False, loss_parallel=False)
    block = plan.styles["model.layers.0.mlp"]
    assert block.prepare_module_input.input_layouts == (Replicate(),)
    assert block.prepare_module_output.desired_output_layouts == (Replicate(),)
    assert "model.layers.0" not in plan.styles


def test_qwen3_moe_dense_layers_keep_the_llama_mlp() -> None:
    plan = resolve_plan(build("qwen3moe", mlp_only_layers=[0]), "auto", sequence_parallel=True, loss_parallel=True)
    _expect(plan, [{**ATTENTION, **QK_NORMS, **DENSE}, {**ATTENTION, **QK_NORMS, **SPARSE}])
    every_dense = build("qwen3moe", mlp_only_layers=[0, 1])
    _expect(resolve_plan(every_dense, "auto", sequence_parallel=True, loss_parallel=True),
            [{**ATTENTION, **QK_NORMS, **DENSE}] * 2)


def test_router_jitter_is_refused() -> None:
    with pytest.raises(PlanError, match="router_jitter_noise=0.1.*each TP rank"):
        resolve_plan(build("mixtral", router_jitter_noise=0.1), "auto", sequence_parallel=True, loss_parallel=True)


class _Mesh:
    """Enough of a DeviceMesh for the checks ExpertsParallel makes before it shards anything."""

    def __init__(self, size: int) -> None:
        self.tp = size

    def size(self) -> int:
        return self.tp


def test_experts_refuse_an_intermediate_size_tp_does_not_divide() -> None:
    experts = build("mixtral").model.layers[0].mlp.experts  # intermediate 32
    with pytest.raises(ModelShapeError, match="intermediate size 32 .*tensor_parallel_size=3"):
        ExpertsParallel()._apply(experts, _Mesh(3))


def test_experts_refuse_a_layout_they_do_not_split() -> None:
    experts = build("mixtral").model.layers[0].mlp.experts
    experts.is_concatenated = False  # gate and up rows interleaved
    with pytest.raises(PlanError, match="gate_up_proj .*is_concatenated"):
        ExpertsParallel()._apply(experts, _Mesh(2))
    with pytest.raises(PlanError, match="one `weight` parameter"):
        RouterParallel()._apply(nn.Linear(4, 4), _Mesh(2))


def test_the_layers_call_attention_by_keyword_and_the_mlp_positionally() -> None:
    """What the plans' PrepareModuleInput(Output) entries assume, and what the MoE block hands its router and
    experts: the flattened (tokens, hidden) block input; the experts also get the router's weights and indices."""
    for kind in ("granite", "mixtral", "qwen3moe"):
        model = build(kind, "cpu")
        seen: dict[str, object] = {}
        _record_calls(model.model.layers[0], seen, moe=kind != "granite")
        model(torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)))
        assert seen["attn"][0] == 0 and "hidden_states" in seen["attn"][1], kind
        assert seen["mlp"] == (1, []), kind
        if kind != "granite":
            assert seen["gate"] == (32, 32) and seen["experts"] == 3, kind


def _record_calls(layer: nn.Module, seen: dict, moe: bool) -> None:
    layer.self_attn.register_forward_pre_hook(lambda m, a, k: seen.update(attn=(len(a), sorted(k))), with_kwargs=True)
    layer.mlp.register_forward_pre_hook(lambda m, a, k: seen.update(mlp=(len(a), sorted(k))), with_kwargs=True)
    if moe:
        layer.mlp.gate.register_forward_pre_hook(lambda m, a: seen.update(gate=tuple(a[0].shape)))
        layer.mlp.experts.register_forward_pre_hook(lambda m, a: seen.update(experts=len(a)))


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("kind", ["granite", "mixtral", "qwen3moe"])
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no_sp"])
def test_plan_applied_on_one_rank_matches_the_model(mesh, kind: str, sp: bool) -> None:
    """Every style wired into the real forward (DTensor and plain tensors meet where they should, the labels= loss
    runs under loss parallel, the MoE aux loss with output_router_logits): equal to the unsharded model, and every
    global parameter in the model's own layout."""
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.parallel.parallelize import apply_tensor_parallel

    extra = {} if kind == "granite" else dict(output_router_logits=True, router_aux_loss_coef=0.1)
    model = build(kind, "cpu", **extra)
    reference = copy.deepcopy(model)
    apply_tensor_parallel(model, resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=True), mesh)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))

    def loss_of(net):
        if kind == "granite":
            return net(input_ids=ids, labels=ids)
        out = net(input_ids=ids)  # the aux loss joins a plain cross entropy (see the family docs)
        out.loss = _full(F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())) + 0.1 * out.aux_loss
        return out

    with loss_parallel():
        out = loss_of(model)
        out.loss.backward()
    ref = loss_of(reference)
    ref.loss.backward()
    torch.testing.assert_close(_full(out.logits), ref.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_full(out.loss), ref.loss)
    params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), name
        whole, grad = param.full_tensor(), _full(param.grad)
        if name.endswith("experts.gate_up_proj"):  # kept as (E, 2, I, H): gate rows, up rows (experts.py)
            assert whole.ndim == 4 and param.placements == (Shard(2),), (name, param.placements)
            whole, grad = whole.flatten(1, 2), grad.flatten(1, 2)
        torch.testing.assert_close(whole, params[name].detach(), atol=0, rtol=0, msg=name)
        torch.testing.assert_close(grad, params[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_granite_multipliers_change_the_model() -> None:
    """The parity above is only a test of the multipliers if they matter: each moves the logits."""
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    base = build("granite", "cpu")(ids).logits
    for name, neutral in (("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
                          ("attention_multiplier", 0.5), ("logits_scaling", 1.0)):
        model = build("granite", "cpu")
        setattr(model.config, name, neutral)
        for module in model.modules():  # the attributes copied from the config at construction
            for attr in ("scaling", name):
                if attr == "scaling" and name == "attention_multiplier" and hasattr(module, "scaling"):
                    module.scaling = neutral
                elif hasattr(module, name):
                    setattr(module, name, neutral)
        assert not torch.allclose(model(ids).logits, base), name


def test_an_expert_width_tp_does_not_divide_is_refused_before_sharding() -> None:
    from lightning_tp.errors import ModelShapeError
    from lightning_tp.parallel.shapes import check_model_shapes

    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=30, num_hidden_layers=1,
            num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2))
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    check_model_shapes(model, plan, 2)
    with pytest.raises(ModelShapeError, match="moe_intermediate_size=30 .*expert width.*divides 30"):
        check_model_shapes(model, plan, 4)


def test_the_vocab_parallel_loss_can_be_added_to_in_place(mesh) -> None:
    """transformers adds the MoE load-balancing loss to the cross entropy with ``+=``: the loss the mode returns
    is a tensor of its own, not a view."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.strategy.loss_parallel import VocabParallelCrossEntropy

    logits = torch.randn(6, 16, requires_grad=True)
    sharded = distribute_tensor(logits, mesh, [Shard(-1)])
    target = torch.randint(0, 16, (6,))
    with VocabParallelCrossEntropy():
        loss = F.cross_entropy(sharded, target)
        loss += 0.5
    with loss_parallel():  # the strategy's backward runs under it
        loss.backward()
    expected = torch.nn.functional.cross_entropy(logits.detach(), target) + 0.5
    torch.testing.assert_close(loss.detach(), expected)


def test_the_plan_table_and_the_planner_see_the_experts_split() -> None:
    """describe_plan (and the planner, through tp_shard_dim) report each expert's intermediate dimension over tp,
    the router whole."""
    from lightning_tp.parallel.plans import describe_plan

    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    rows = {r["module"]: r["params"] for r in describe_plan(model, plan, 4)}
    assert rows["model.layers.0.mlp.experts"] == {"gate_up_proj": ((4, 128, 64), (4, 32, 64)),
                                                   "down_proj": ((4, 64, 64), (4, 64, 16))}
    assert rows["model.layers.0.mlp.gate"] == {"weight": ((4, 64), (4, 64))}
