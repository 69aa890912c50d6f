"""Activation checkpointing and per-block compile wrap each block's forward: gradients unchanged, names unchanged.

Single process. The reference is the same model without any wrapping; multi-rank parity with TP, SP and FSDP2,
the collectives of each mode and a checkpoint saved in one mode and resumed in another are in
``tests/multiprocess/test_parity.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from lightning_tp.models import Llama, get_config
from lightning_tp.parallel.plans import resolve_plan
from lightning_tp.parallel.recompute import apply_activation_checkpointing, selective_policy


@pytest.fixture(scope="module")
def base() -> Llama:
    model = Llama(get_config("debug"))
    model.init_weights(seed=0)
    return model


def _loss_and_grads(model: Llama) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_blocks_give_the_same_gradients_and_names(base: Llama, mode: str) -> None:
    ref_loss, ref_grads = _loss_and_grads(copy.deepcopy(base))
    model = copy.deepcopy(base)
    plan = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
    assert apply_activation_checkpointing(model, plan, mode) == ["model.layers.0", "model.layers.1"]
    assert list(model.state_dict()) == list(base.state_dict())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]
    loss, grads = _loss_and_grads(model)
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6, msg=name)


def test_checkpointing_recomputes_in_backward(base: Llama) -> None:
    # Count the block's forward calls: once without checkpointing; twice (forward + recompute) with it.
    model = copy.deepcopy(base)
    plan = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    _loss_and_grads(model)
    assert len(calls) == 1
    apply_activation_checkpointing(model, plan, "full")
    calls.clear()
    _loss_and_grads(model)
    assert len(calls) == 2


def test_mode_is_checked_and_applied_once(base: Llama) -> None:
    model = copy.deepcopy(base)
    plan = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
    with pytest.raises(ValueError, match="'partial'.*none, full, selective"):
        apply_activation_checkpointing(model, plan, "partial")
    assert apply_activation_checkpointing(model, plan, "none") == []
    apply_activation_checkpointing(model, plan, "full")
    with pytest.raises(RuntimeError, match="already has activation checkpointing"):
        apply_activation_checkpointing(model, plan, "selective")


def test_selective_policy_recomputes_partial_sums_and_cheap_ops() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.utils.checkpoint import CheckpointPolicy

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        policy = selective_policy()
        aten = torch.ops.aten
        x, w = torch.ones(4, 8), torch.ones(8, 3)
        col_in = distribute_tensor(x, mesh, [Replicate()])  # colwise: contraction dim replicated
        row_in = distribute_tensor(x, mesh, [Shard(1)])  # rowwise: contraction dim sharded -> partial sum
        assert policy(None, aten.mm.default, col_in, w) == CheckpointPolicy.MUST_SAVE
        assert policy(None, aten.mm.default, x, w) == CheckpointPolicy.MUST_SAVE
        assert policy(None, aten.mm.default, row_in, w) == CheckpointPolicy.PREFER_RECOMPUTE
        assert policy(None, aten.addmm.default, torch.ones(3), row_in, w) == CheckpointPolicy.PREFER_RECOMPUTE
        assert policy(None, torch.ops._c10d_functional.reduce_scatter_tensor.default) == CheckpointPolicy.MUST_SAVE
        assert policy(None, torch.ops._c10d_functional.all_gather_into_tensor.default) == \
            CheckpointPolicy.PREFER_RECOMPUTE
        for op in (aten.mul.Tensor, aten.rsqrt.default, aten.silu.default):
            assert policy(None, op, x) == CheckpointPolicy.PREFER_RECOMPUTE
        sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
        assert policy(None, sdpa, x) == CheckpointPolicy.MUST_SAVE
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_transformers_llama_blocks_checkpoint_with_the_same_gradients(mode: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        model(input_ids=tokens, labels=tokens).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads(copy.deepcopy(base))
    model = copy.deepcopy(base)
    plan = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
    assert apply_activation_checkpointing(model, plan, mode) == ["model.layers.0", "model.layers.1"]
    assert list(model.state_dict()) == list(base.state_dict())
    assert base.config.use_cache and not model.config.use_cache  # a growing KV cache would break recomputation
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-6, msg=name)
