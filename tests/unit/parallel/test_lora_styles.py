"""PEFT LoRA layers under the plan (lightning_tp/parallel/lora.py), in one process: which style each adapted
projection gets, what is refused (before any rank starts, through ``Trainer.fit``), the adapters' own init after a
meta model's ``init_weights``, and the styles' forward and backward on a 1-rank mesh against PEFT's own (the
sharding itself is checked at tp 2 and 4 by tests/multiprocess/test_lora.py)."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from launching import SpawnBlocked
from torch import nn

from lightning_tp import TensorParallelStrategy
from lightning_tp.errors import PlanError
from lightning_tp.parallel.heads import HeadsColwise, KVHeadsColwise
from lightning_tp.parallel.lora import LoraColwise, LoraRowwise, adapt_styles, lora_layers, reset_adapters
from lightning_tp.parallel.plans import describe_plan, resolve_plan

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_llama(targets: list[str] = ALL, heads: int = 8, kv: int = 4, **lora: Any) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=4 * heads, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=4,
                                      max_position_embeddings=32)
    torch.manual_seed(1)
    options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, **lora}
    return peft.get_peft_model(transformers.LlamaForCausalLM(config),
                               peft.LoraConfig(target_modules=targets, **options))


def _styles(model: nn.Module) -> dict[str, Any]:
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    return adapt_styles(model, plan.styles)


def test_adapted_projections_follow_their_base_style() -> None:
    model = _peft_llama(heads=9, kv=3)
    styles = _styles(model)
    layer = "base_model.model.model.layers.0"
    q, k, o, down = (styles[f"{layer}.{p}"] for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                                                      "mlp.down_proj"))
    assert isinstance(q, LoraColwise) and isinstance(q.base, HeadsColwise)
    assert isinstance(k, LoraColwise) and isinstance(k.base, KVHeadsColwise)
    assert isinstance(o, LoraRowwise) and isinstance(down, LoraRowwise)
    assert not any(".lora_" in p or p.endswith(".base_layer") for p in styles)
    assert len(lora_layers(model)) == 2 * len(ALL)


def test_describe_plan_shows_each_adapter_split_like_its_base() -> None:
    model = _peft_llama()
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
    rows = {r["module"].rpartition("layers.0.")[2]: r for r in describe_plan(model, plan, 2)}
    q, o = rows["self_attn.q_proj"], rows["self_attn.o_proj"]
    assert q["style"] == "LoRA on ColwiseParallel" and o["style"] == "LoRA on RowwiseParallel"
    # column-parallel base: A whole on every rank, B split by output rows as the base
    assert q["params"]["base_layer.weight"] == ((32, 32), (16, 32))
    assert q["params"]["lora_A.default.weight"] == ((4, 32), (4, 32))
    assert q["params"]["lora_B.default.weight"] == ((32, 4), (16, 4))
    # row-parallel base: A split by input columns as the base, B whole
    assert o["params"]["base_layer.weight"] == ((32, 32), (32, 16))
    assert o["params"]["lora_A.default.weight"] == ((4, 32), (4, 16))
    assert o["params"]["lora_B.default.weight"] == ((32, 4), (32, 4))


@pytest.mark.parametrize("targets, lora, names", [
    (["q_proj", "lm_head"], {}, ["lm_head", "target_modules"]),
    (["q_proj"], {"use_dora": True}, ["q_proj", "use_dora=False"]),
    (["q_proj"], {"lora_bias": True}, ["lora_bias=False"]),
], ids=["lm_head", "dora", "lora_bias"])
def test_adapters_that_cannot_follow_the_plan_are_refused_by_name(targets: list[str], lora: dict,
                                                                  names: list[str]) -> None:
    model = _peft_llama(targets, **lora)
    with pytest.raises(PlanError) as info:
        _styles(model)
    assert all(n in str(info.value) for n in names), str(info.value)


def test_adapters_on_a_module_the_plan_leaves_whole_are_refused() -> None:
    model = _peft_llama(["q_proj"])
    plan = {"base_model.model.model.layers.*.self_attn.k_proj": torch.distributed.tensor.parallel.ColwiseParallel()}
    resolved = resolve_plan(model, plan, sequence_parallel=False, loss_parallel=False)
    with pytest.raises(PlanError, match="does not shard .*q_proj"):
        adapt_styles(model, resolved.styles)


class _UserModule(L.LightningModule):
    def __init__(self, targets: list[str]) -> None:
        super().__init__()
        self.model = _peft_llama(targets)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch).logits.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())


@pytest.mark.usefixtures("no_spawn")
def test_a_users_peft_model_with_an_unshardable_target_fails_before_any_rank_starts() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                        strategy=TensorParallelStrategy(tensor_parallel_size=2))
    with pytest.raises(PlanError, match="lm_head"):
        trainer.fit(_UserModule(["q_proj", "lm_head"]), [torch.zeros(1, 8, dtype=torch.long)])
    good = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                     strategy=TensorParallelStrategy(tensor_parallel_size=2))
    with pytest.raises(SpawnBlocked):  # the same module with shardable targets gets as far as the launch
        good.fit(_UserModule(["q_proj", "o_proj"]), [torch.zeros(1, 8, dtype=torch.long)])


def test_adapters_get_their_own_init_after_the_base_model_initialises_itself() -> None:
    model = _peft_llama(init_lora_weights=True)
    for layer in lora_layers(model).values():  # what a base model's init_weights does to every Linear
        for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
            nn.init.normal_(linear.weight)
    other = copy.deepcopy(model)
    assert reset_adapters(model, seed=3) == reset_adapters(other, seed=3) == 2 * len(ALL)
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        if "lora_B" in name:
            assert not a.any(), name  # B = 0: the adapted model starts as the base
        assert torch.equal(a, b), name  # every rank draws the same A from the seed


def test_styles_on_one_rank_compute_what_peft_computes(mesh: Any) -> None:
    """On a 1-rank mesh the styles run their real code paths (DTensor parameters, the row-parallel forward that adds
    the adapters before the reduction, the frozen base kept frozen) and must give PEFT's logits and gradients."""
    from lightning_tp.parallel.parallelize import apply_tensor_parallel

    model = _peft_llama(lora_alpha=16)
    reference = copy.deepcopy(model)
    resolved = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
    apply_tensor_parallel(model, resolved, mesh)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    mine = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        assert mine[name].requires_grad == param.requires_grad, name
        if param.requires_grad:
            torch.testing.assert_close(mine[name].grad.full_tensor(), param.grad, rtol=0, atol=1e-6)
        else:
            assert mine[name].grad is None, name
    with model.disable_adapter(), reference.disable_adapter():  # the base alone, through the same forward
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_adapter_dropout_keeps_a_mask_not_a_dropped_copy_and_its_gradients_are_exact() -> None:
    """PEFT gives q, k and v their own dropout: each keeps a dropped copy of the whole input for backward. The
    adapters' input path keeps the input once and a 1-byte mask per adapter, and its gradients are those of
    ``F.linear(x * mask / (1 - p), A)`` for the mask it drew."""
    from lightning_tp.parallel.lora import _DroppedLinear

    p = 0.3
    x = torch.randn(2, 16, 32, requires_grad=True)
    weights = [torch.randn(4, 32, requires_grad=True) for _ in range(3)]

    def saved_bytes(fn: Any) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(storages.values()) - sum(w.numel() * 4 for w in weights)  # the weights are kept either way

    peft_way = saved_bytes(lambda: [torch.nn.functional.linear(torch.nn.functional.dropout(x, p), w) for w in weights])
    ours = saved_bytes(lambda: [_DroppedLinear.apply(x, w, p) for w in weights])
    assert ours == x.numel() * 4 + 3 * x.numel(), ours  # x once (fp32) + three bool masks
    assert peft_way >= 3 * x.numel() * 4, peft_way  # three dropped fp32 copies, at least
    torch.manual_seed(5)
    out = [_DroppedLinear.apply(x, w, p) for w in weights]
    sum(o.square().sum() for o in out).backward()
    got = [x.grad.clone(), *(w.grad.clone() for w in weights)]
    x.grad = None
    for w in weights:
        w.grad = None
    torch.manual_seed(5)  # the same draws, as plain autograd on x * mask / (1 - p)
    masks = [torch.rand_like(x, dtype=torch.float32) >= p for _ in weights]
    ref = [torch.nn.functional.linear(x * m / (1 - p), w) for m, w in zip(masks, weights, strict=True)]
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-5)
    sum(r.square().sum() for r in ref).backward()
    for g, r in zip(got, [x.grad, *(w.grad for w in weights)], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-5)
