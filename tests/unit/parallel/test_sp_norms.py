"""The sequence-parallel norm style on local tensors (``lightning_tp.parallel.styles.SequenceParallelNorm``) and the
per-head norm style: every norm class the families plan, on each rank of a fake 2-rank world, against the unsharded
norm and against torch's ``SequenceParallel`` (the numerics of whole models at tp 2 and 4 are the family and parity
workers')."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from launching import fake_world
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from lightning_tp.models.llama import RMSNorm
from lightning_tp.parallel.styles import HeadShardedNorm, SequenceParallelNorm

transformers = pytest.importorskip("transformers")

H, TP = 16, 2


def _hf(module: str, cls: str) -> Callable[[], nn.Module]:
    import importlib

    return lambda: getattr(importlib.import_module(f"transformers.models.{module}"), cls)(H)


NORMS: dict[str, Callable[[], nn.Module]] = {
    "native": lambda: RMSNorm(H),  # the autograd Function keeping one fp32 scale per token
    "llama": _hf("llama.modeling_llama", "LlamaRMSNorm"),
    "qwen2": _hf("qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    "mistral": _hf("mistral.modeling_mistral", "MistralRMSNorm"),
    "gemma": _hf("gemma.modeling_gemma", "GemmaRMSNorm"),  # x̂ · (1 + w)
    "gemma3": _hf("gemma3.modeling_gemma3", "Gemma3RMSNorm"),
    "olmo2": _hf("olmo2.modeling_olmo2", "Olmo2RMSNorm"),
    "phi3": _hf("phi3.modeling_phi3", "Phi3RMSNorm"),
    "granite": _hf("granite.modeling_granite", "GraniteRMSNorm"),
    "cohere": _hf("cohere.modeling_cohere", "CohereLayerNorm"),  # mean-centred, no bias
    "layernorm": lambda: nn.LayerNorm(H),  # weight and bias
}


def _norm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    module = NORMS[kind]()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.5)  # not the ones init: a gradient that ignored the weight would show
    return module


def _run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    x = x.clone().requires_grad_()
    out = module(x)
    local = out.to_local() if isinstance(out, DTensor) else out
    local.backward(grad)
    return local.detach(), x.grad, [p.grad for p in module.parameters()]


def _shard(t: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
    return t.chunk(TP, dim)[rank].contiguous()


@pytest.mark.parametrize("kind", list(NORMS))
def test_shards_of_every_norm_sum_to_the_unsharded_gradients(kind: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(1)
    x, grad = torch.randn(2, 8, H), torch.randn(2, 8, H)
    full_out, full_dx, full_dw = _run(_norm(kind), x, grad)
    outs, dxs, dws = [], [], []
    for rank in range(TP):
        with fake_world(rank, TP):
            module = parallelize_module(_norm(kind), init_device_mesh("cpu", (TP,)),
                                        SequenceParallelNorm(use_local_output=True))
            out, dx, dw = _run(module, _shard(x, rank), _shard(grad, rank))
            assert all(isinstance(p, DTensor) and p.placements == (Replicate(),) for p in module.parameters())
            assert all(isinstance(g, DTensor) and g.placements == (Partial(),) for g in dw)
        outs.append(out)
        dxs.append(dx)
        dws.append([g.to_local() for g in dw])
    # per-token ops: each token's output and input gradient are exactly the unsharded ones
    assert torch.equal(torch.cat(outs, 1), full_out) and torch.equal(torch.cat(dxs, 1), full_dx)
    # the weight gradients are partial sums over each rank's tokens (summed in another order)
    for parts, whole in zip(zip(*dws, strict=True), full_dw, strict=True):
        torch.testing.assert_close(sum(parts), whole)


@pytest.mark.parametrize("kind", ["native", "gemma", "layernorm"])
@pytest.mark.parametrize("rank", range(TP))
def test_local_computation_equals_torchs_sequence_parallel_bit_for_bit(kind: str, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(2)
    x, grad = torch.randn(2, 8, H), torch.randn(2, 8, H)
    results = []
    with fake_world(rank, TP):
        mesh = init_device_mesh("cpu", (TP,))
        for style in (SequenceParallel(), SequenceParallelNorm()):
            module = parallelize_module(_norm(kind), mesh, style)
            out = module(_shard(x, rank).requires_grad_())
            assert isinstance(out, DTensor) and out.placements == (Shard(1),)  # the parent's output layout
            results.append(_run(module, _shard(x, rank), _shard(grad, rank)))
    (out_a, dx_a, dw_a), (out_b, dx_b, dw_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(dw_a, dw_b, strict=True))


def test_a_dtensor_input_is_brought_to_the_sequence_shard() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(3)
    x = torch.randn(2, 8, H)
    with fake_world(1, TP):
        mesh = init_device_mesh("cpu", (TP,))
        module = parallelize_module(_norm("llama"), mesh, SequenceParallelNorm(use_local_output=True))
        # a replicated DTensor: the redistribution to Shard(1) is a local slice of this rank's half
        out = module(DTensor.from_local(x, mesh, [Replicate()], run_check=False))
        assert torch.equal(out, _norm("llama")(_shard(x, 1)))
        with pytest.raises(TypeError, match="LlamaRMSNorm under SequenceParallelNorm expects a tensor"):
            module([x])


class _Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not isinstance(self.weight, DTensor)  # the local tensor during the call
        raise RuntimeError("forward failed")


def test_parameters_names_and_copies_are_untouched_even_when_the_forward_raises() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with fake_world(0, TP):
        mesh = init_device_mesh("cpu", (TP,))
        module = parallelize_module(_Failing(), mesh, SequenceParallelNorm())
        param = module.weight
        with pytest.raises(RuntimeError, match="forward failed"):
            module(torch.randn(2, 4, H))
        assert module.weight is param and list(module.state_dict()) == ["weight"]
        # a deep copy runs its own weight (the hooks take the module they are called on)
        norm = parallelize_module(_norm("native"), mesh, SequenceParallelNorm(use_local_output=True))
        twin = copy.deepcopy(norm)
        with torch.no_grad():
            twin.weight.to_local().mul_(2.0)
        x = torch.randn(2, 4, H)
        torch.testing.assert_close(twin(x), 2.0 * norm(x))


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_per_head_norm_gradients_are_partial_sums_over_the_ranks_heads(kind: str) -> None:
    """Qwen3's q/k norms see ``(b, s, heads, head_dim)``, Gemma-3's ``(b, heads, s, head_dim)``: either way each
    rank's heads give a partial weight gradient."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tp.parallel.families.gemma import HeadsFirstNorm

    style, heads_dim = (HeadShardedNorm, 2) if kind == "qwen3" else (HeadsFirstNorm, 1)
    make = {"qwen3": _hf("qwen3.modeling_qwen3", "Qwen3RMSNorm"),
            "gemma3": _hf("gemma3.modeling_gemma3", "Gemma3RMSNorm")}[kind]
    torch.manual_seed(4)
    shape = [2, 6, 6, H]
    shape[heads_dim] = 4
    x, grad = torch.randn(shape), torch.randn(shape)
    torch.manual_seed(0)
    reference = make()
    with torch.no_grad():
        reference.weight.normal_(0.0, 0.5)
    weight = reference.weight.detach().clone()
    full_out, full_dx, (full_dw,) = _run(reference, x, grad)
    outs, dxs, dws = [], [], []
    for rank in range(TP):
        with fake_world(rank, TP):
            module = make()
            with torch.no_grad():
                module.weight.copy_(weight)
            module = parallelize_module(module, init_device_mesh("cpu", (TP,)), style())
            out, dx, (dw,) = _run(module, _shard(x, rank, heads_dim), _shard(grad, rank, heads_dim))
            assert not isinstance(out, DTensor) and dw.placements == (Partial(),)
        outs.append(out)
        dxs.append(dx)
        dws.append(dw.to_local())
    assert torch.equal(torch.cat(outs, heads_dim), full_out)
    assert torch.equal(torch.cat(dxs, heads_dim), full_dx)
    torch.testing.assert_close(sum(dws), full_dw)


@pytest.mark.parametrize("kind", ["native", "gemma", "layernorm"])
def test_replicated_norms_without_sp_compute_the_whole_gradient_on_every_rank(kind: str) -> None:
    """``ReplicateParallel`` (the norms of the TP-only plans): the same whole input on every rank, the unsharded
    output and gradients bit for bit, the weight gradient ``Replicate()`` (nothing to sum)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tp.parallel.styles import ReplicateParallel

    torch.manual_seed(5)
    x, grad = torch.randn(2, 8, H), torch.randn(2, 8, H)
    full_out, full_dx, full_dw = _run(_norm(kind), x, grad)
    with fake_world(1, TP):
        module = parallelize_module(_norm(kind), init_device_mesh("cpu", (TP,)), ReplicateParallel())
        out, dx, dw = _run(module, x, grad)
        assert all(isinstance(p, DTensor) and p.placements == (Replicate(),) for p in module.parameters())
        assert all(g.placements == (Replicate(),) for g in dw)
    assert torch.equal(out, full_out) and torch.equal(dx, full_dx)
    assert all(torch.equal(g.to_local(), whole) for g, whole in zip(dw, full_dw, strict=True))
