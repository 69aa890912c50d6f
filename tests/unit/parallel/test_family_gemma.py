"""The Gemma family (:mod:`lightning_tp.parallel.families.gemma`) in one process: the auto plan of tiny meta-device
Gemma / Gemma-2 / Gemma-3 models, its styles per module, the shape checks, the calling conventions the plan relies
on, and the whole plan applied on a 1-rank mesh against the unsharded model (the multi-rank numerics are the family
worker's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

from lightning_tp.errors import ModelShapeError
from lightning_tp.parallel.families import family_of
from lightning_tp.parallel.families.gemma import GEMMA, HeadsFirstNorm
from lightning_tp.parallel.heads import HeadsColwise, HeadsRowwise, KVHeadsColwise
from lightning_tp.parallel.plans import ReplicateParallel, resolve_plan
from lightning_tp.parallel.shapes import attention_problems, check_model_shapes
from lightning_tp.parallel.styles import SequenceParallelNorm

transformers = pytest.importorskip("transformers")

# Gemma-2B / Gemma-2-2B / Gemma-3-1B head ratios, head_dim != hidden / heads, for Gemma-2/3 a sliding window below
# the sequence length.
SMALL = dict(vocab_size=64, intermediate_size=48, num_hidden_layers=2, head_dim=8, max_position_embeddings=64,
             attn_implementation="eager")
WINDOWED = dict(query_pre_attn_scalar=6, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
SHAPES = {"gemma": dict(hidden_size=24, num_attention_heads=8, num_key_value_heads=1),
          "gemma2": dict(hidden_size=32, num_attention_heads=8, num_key_value_heads=4,
                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **WINDOWED),
          "gemma3": dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=1, **WINDOWED)}
KINDS = list(SHAPES)


def build(kind: str, device: str = "meta") -> torch.nn.Module:
    config_cls, model_cls = {"gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
                             "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                             "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[kind]
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config_cls(**SMALL, **SHAPES[kind]))
    if device != "meta":
        with torch.no_grad():  # away from the (1 + weight) zero init, so that a lost norm gradient shows
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.5)
    return model


LAYER = {  # module -> style type under SP (None: the norm style)
    "input_layernorm": SequenceParallelNorm,
    "self_attn": PrepareModuleInput,
    "self_attn.q_proj": HeadsColwise,
    "self_attn.k_proj": KVHeadsColwise,
    "self_attn.v_proj": KVHeadsColwise,
    "self_attn.o_proj": HeadsRowwise,
    "post_attention_layernorm": SequenceParallelNorm,
    "pre_feedforward_layernorm": SequenceParallelNorm,
    "mlp": PrepareModuleInput,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
    "post_feedforward_layernorm": SequenceParallelNorm,
}
QK_NORMS = {"self_attn.q_norm": HeadsFirstNorm, "self_attn.k_norm": HeadsFirstNorm}
SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma-2/3 only


@pytest.mark.parametrize("kind", KINDS)
def test_auto_plan_covers_every_module_with_its_style(kind: str) -> None:
    model = build(kind)
    assert family_of(model) is GEMMA
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    layer = {k: v for k, v in LAYER.items() if kind != "gemma" or k not in SANDWICH}
    layer.update(QK_NORMS if kind == "gemma3" else {})
    expected = {f"model.layers.{i}.{name}" for i in range(2) for name in layer}
    expected |= {"model.embed_tokens", "model.norm", "lm_head", "model.layers.0"}
    assert set(plan.styles) == expected
    for i in range(2):
        for name, style_type in layer.items():
            assert type(plan.styles[f"model.layers.{i}.{name}"]) is style_type, name
    styles = plan.styles
    assert type(styles["model.norm"]) is SequenceParallelNorm
    # Gemma-2/3: the sublayer output norms feed the residual add (a plain tensor); the input norms feed
    # PrepareModuleInput. Gemma's post_attention_layernorm is the MLP's input norm, as in Llama.
    outputs = ("post_attention_layernorm", "post_feedforward_layernorm") if kind != "gemma" else ()
    for name in ("input_layernorm", "post_attention_layernorm", *(SANDWICH if kind != "gemma" else ())):
        assert styles[f"model.layers.0.{name}"].use_local_output is (name in outputs), name
    attn, mlp = styles["model.layers.0.self_attn"], styles["model.layers.0.mlp"]
    assert attn.input_kwarg_layouts == {"hidden_states": Shard(1)}
    assert mlp.input_layouts == (Shard(1),) and mlp.desired_input_layouts == (Replicate(),)
    heads, kv = SHAPES[kind]["num_attention_heads"], SHAPES[kind]["num_key_value_heads"]
    assert styles["model.layers.1.self_attn.q_proj"].num_heads == heads
    k_proj = styles["model.layers.1.self_attn.k_proj"]
    assert (k_proj.num_key_value_heads, k_proj.num_heads) == (kv, heads)
    head = styles["lm_head"]
    assert head.output_layouts == (Shard(-1),) and head.use_local_output is False  # soft-capping on the shards


@pytest.mark.parametrize("kind", KINDS)
def test_without_sequence_parallel_every_norm_is_replicated(kind: str) -> None:
    plan = resolve_plan(build(kind), "auto", sequence_parallel=False, loss_parallel=False)
    for name in ("input_layernorm", "post_attention_layernorm", *(SANDWICH if kind != "gemma" else ())):
        assert type(plan.styles[f"model.layers.1.{name}"]) is ReplicateParallel, name
    assert "model.layers.0" not in plan.styles
    assert plan.styles["lm_head"].output_layouts == (Replicate(),)
    if kind == "gemma3":  # the per-head norms see a rank's own heads with or without SP
        assert type(plan.styles["model.layers.0.self_attn.q_norm"]) is HeadsFirstNorm


def test_shape_checks_take_kv_replication_and_refuse_more_ranks_than_query_heads() -> None:
    gemma3 = build("gemma3")  # 4 query / 1 KV head
    plan = resolve_plan(gemma3, "auto", sequence_parallel=True, loss_parallel=True)
    for tp in (2, 4):  # the KV head replicated; the attention keeps no head count, so it can take the layout
        check_model_shapes(gemma3, plan, tp)
        assert attention_problems(gemma3, plan, tp) == []
    with pytest.raises(ModelShapeError, match="num_attention_heads=4 .*tensor_parallel_size=8"):
        check_model_shapes(gemma3, plan, 8)
    gemma2 = build("gemma2")  # 8 query / 4 KV heads: KV replicated at tp 8
    check_model_shapes(gemma2, resolve_plan(gemma2, "auto", sequence_parallel=True, loss_parallel=True), 8)


@pytest.mark.parametrize("kind", KINDS)
def test_the_layer_calls_attention_by_keyword_and_mlp_positionally(kind: str) -> None:
    """What the plan's PrepareModuleInput entries assume (``hidden_states=`` for attention, positional for the MLP),
    the embedding's own scaling, and the layout Gemma-3's q/k norms see: ``(bs, heads, seqlen, head_dim)``."""
    model = build(kind, "cpu")
    seen: dict[str, object] = {}
    layer = model.model.layers[0]
    layer.self_attn.register_forward_pre_hook(lambda m, a, k: seen.update(attn=(len(a), sorted(k))), with_kwargs=True)
    layer.mlp.register_forward_pre_hook(lambda m, a, k: seen.update(mlp=(len(a), sorted(k))), with_kwargs=True)
    if kind == "gemma3":
        layer.self_attn.q_norm.register_forward_pre_hook(lambda m, a: seen.update(q_norm=tuple(a[0].shape)))
        layer.self_attn.k_norm.register_forward_pre_hook(lambda m, a: seen.update(k_norm=tuple(a[0].shape)))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids)
    assert seen["attn"][0] == 0 and "hidden_states" in seen["attn"][1]
    assert seen["mlp"] == (1, [])
    if kind == "gemma3":
        assert seen["q_norm"] == (2, 4, 16, 8) and seen["k_norm"] == (2, 1, 16, 8)
    embed = model.model.embed_tokens
    assert isinstance(embed, torch.nn.Embedding)  # RowwiseParallel's embedding path
    scale = SHAPES[kind]["hidden_size"] ** 0.5
    torch.testing.assert_close(embed(ids), torch.nn.functional.embedding(ids, embed.weight) * scale)
    assert model.lm_head.weight is embed.weight  # tied


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no_sp"])
def test_plan_applied_on_one_rank_matches_the_model(mesh, kind: str, sp: bool) -> None:
    """Every style of the plan wired into the real forward (DTensor and plain tensors meet where they should, the
    tie survives, the labels= loss runs under loss parallel): equal to the unsharded model."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.parallel.parallelize import apply_tensor_parallel

    model = build(kind, "cpu")
    reference = copy.deepcopy(model)
    apply_tensor_parallel(model, resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=True), mesh)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with loss_parallel():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    ref = reference(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert isinstance(out.logits, DTensor)
    torch.testing.assert_close(out.logits.full_tensor(), ref.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss.full_tensor() if isinstance(out.loss, DTensor) else out.loss, ref.loss)
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        torch.testing.assert_close(grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)
