"""Single-process tests of the Phi-3 and OLMo-2 families (:mod:`lightning_tp.parallel.families.phi3`,
:mod:`~lightning_tp.parallel.families.olmo2`) and the fused-projection style (:mod:`lightning_tp.parallel.fused`):
plans on meta-device models, the refusals, the row orders, and each plan wired into the real forward on a 1-rank
mesh. Multi-rank parity is ``tests/workers/family_cases/{phi3,olmo2}.py``."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

from lightning_tp.errors import ModelShapeError, PlanError
from lightning_tp.parallel.families import family_of
from lightning_tp.parallel.families.olmo2 import FullWidthShardedNorm
from lightning_tp.parallel.families.phi3 import LocalHeadsAttention
from lightning_tp.parallel.fused import FusedColwise, _local_order, grouped_rows, original_rows, restore_fused_rows
from lightning_tp.parallel.plans import resolve_plan
from lightning_tp.parallel.shapes import check_model_shapes
from lightning_tp.parallel.styles import ReplicateParallel

VOCAB = 64


def phi3(heads: int = 8, kv: int = 2, layers: int = 2, device: str = "meta") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=heads * 4, intermediate_size=24,
                                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                     max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    with torch.device(device):
        return transformers.Phi3ForCausalLM(config)


def olmo2(heads: int = 4, layers: int = 2, device: str = "meta") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Olmo2Config(vocab_size=VOCAB, hidden_size=heads * 4, intermediate_size=24,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    with torch.device(device):
        model = transformers.Olmo2ForCausalLM(config)
    if device != "meta":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
    return model


def styles(model: torch.nn.Module, sp: bool = True) -> dict[str, object]:
    return resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=True).styles


def test_families_registered() -> None:
    assert family_of(phi3()).name == "phi3"
    assert family_of(olmo2()).name == "olmo2"
    assert family_of(olmo2()).extras
    assert "qkv_proj" in family_of(phi3()).extras  # Phi-3: the minimum unless its heads are selected per rank


def test_phi3_plan_splits_the_fused_projections_by_unit() -> None:
    plan = styles(phi3(8, 2))
    qkv, gate_up = plan["model.layers.1.self_attn.qkv_proj"], plan["model.layers.1.mlp.gate_up_proj"]
    assert isinstance(qkv, FusedColwise) and (qkv.parts, qkv.units) == ((32, 8, 8), 2)
    assert isinstance(gate_up, FusedColwise) and (gate_up.parts, gate_up.units) == ((24, 24), 24)
    attention = plan["model.layers.0.self_attn"]
    assert isinstance(attention, LocalHeadsAttention) and isinstance(attention, PrepareModuleInput)
    assert (attention.num_attention_heads, attention.num_key_value_heads) == (8, 2)
    assert isinstance(plan["model.layers.0.self_attn.o_proj"], RowwiseParallel)
    assert isinstance(plan["model.layers.0.mlp.down_proj"], RowwiseParallel)
    assert isinstance(plan["model.layers.0.input_layernorm"], SequenceParallel)
    assert not any(n.endswith((".q_proj", ".k_proj", ".v_proj", ".gate_proj", ".up_proj")) for n in plan)


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no_sp"])
def test_olmo2_plan_has_post_norms_and_full_width_qk_norms(sp: bool) -> None:
    plan = styles(olmo2(), sp)
    assert not any("input_layernorm" in n for n in plan)
    for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
        style = plan[f"model.layers.1.{norm}"]
        if sp:  # their outputs meet the residual stream as plain tensors
            assert isinstance(style, SequenceParallel) and style.use_local_output
        else:
            assert isinstance(style, ReplicateParallel)
    for norm in ("q_norm", "k_norm"):
        assert isinstance(plan[f"model.layers.0.self_attn.{norm}"], FullWidthShardedNorm)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert type(plan[f"model.layers.0.self_attn.{proj}"]) is ColwiseParallel  # even split, no head selection


@pytest.mark.parametrize(("model", "tp", "needle"), [
    (lambda: phi3(8, 2), 16, "num_attention_heads=8 .*at least one whole query head"),
    (lambda: olmo2(6), 4, "num_attention_heads=6"),  # uneven heads: the norm rows cannot follow selected heads
])
def test_refused_before_sharding(model, tp: int, needle: str) -> None:
    model = model()
    with pytest.raises(ModelShapeError, match=needle):
        check_model_shapes(model, resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True), tp)


def test_phi3_heads_tp_does_not_divide_are_accepted() -> None:
    """Phi-3-medium's 10 KV heads at tp 4 and 8, 9 query heads at tp 2: the fused qkv_proj replicated with each
    rank's heads selected (FusedHeadsColwise), as the Llama plan does for q/k/v."""
    for heads, kv, tp in ((40, 10, 2), (40, 10, 4), (40, 10, 8), (9, 3, 2), (8, 2, 4)):
        model = phi3(heads, kv)
        check_model_shapes(model, resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True), tp)


def test_styles_refuse_a_tp_they_cannot_split() -> None:
    """The styles check again when applied (a plan used without check_model_shapes), naming the module."""
    mesh = SimpleNamespace(size=lambda: 4)
    with pytest.raises(ModelShapeError, match=r"self_attn.qkv_proj.*divides 10"):
        FusedColwise((160, 40, 40), 10, what="self_attn.qkv_proj")._apply(torch.nn.Linear(8, 240), mesh)
    with pytest.raises(ModelShapeError, match="num_attention_heads=40 is fewer than tensor_parallel_size=64"):
        LocalHeadsAttention(40, 10)._apply(phi3(40, 10).model.layers[0].self_attn, SimpleNamespace(size=lambda: 64))
    with pytest.raises(PlanError, match="240 output rows"):
        FusedColwise((160, 40, 40), 10)._apply(torch.nn.Linear(8, 16), mesh)
    with pytest.raises(PlanError, match="RMSNorm"):
        FullWidthShardedNorm()._apply(torch.nn.LayerNorm(8), mesh)


@pytest.mark.parametrize(("parts", "units", "tp"), [((8, 2, 2), 2, 2), ((12, 4, 4), 4, 2), ((4, 4), 4, 4),
                                                    ((6, 2, 2), 2, 1)])
def test_each_rank_holds_its_own_share_of_every_part(parts, units: int, tp: int) -> None:
    rows = grouped_rows(parts, units)
    assert sorted(rows.tolist()) == list(range(sum(parts)))
    assert torch.equal(rows[original_rows(parts, units)], torch.arange(sum(parts)))
    local = sum(parts) // tp
    starts = [sum(parts[:p]) for p in range(len(parts))]
    for rank in range(tp):
        held = rows[rank * local:(rank + 1) * local][_local_order(parts, units, tp)]
        want = [s + rank * n // tp + t for s, n in zip(starts, parts, strict=True) for t in range(n // tp)]
        assert held.tolist() == want  # [part 0 of rank | part 1 of rank | ...], the model's own split works


@pytest.mark.parametrize("build", [lambda: phi3(8, 2, device="cpu"), lambda: olmo2(device="cpu")],
                         ids=["phi3", "olmo2"])
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no_sp"])
def test_plan_applied_on_one_rank_matches_the_model(mesh, build, sp: bool) -> None:
    """Every style wired into the real forward equals the unsharded model; the fused weights and their gradients
    come back in the model's own row order through restore_fused_rows."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from lightning_tp.parallel.parallelize import apply_tensor_parallel

    model = build()
    reference = copy.deepcopy(model)
    apply_tensor_parallel(model, resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=True), mesh)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with loss_parallel():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    ref = reference(input_ids=ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits.full_tensor(), ref.logits, atol=1e-6, rtol=1e-5)

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    weights = restore_fused_rows(model, {n: full(p).detach() for n, p in model.named_parameters()})
    grads = restore_fused_rows(model, {n: full(p.grad) for n, p in model.named_parameters()})
    for name, param in reference.named_parameters():
        torch.testing.assert_close(weights[name], param.detach(), msg=name)
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
