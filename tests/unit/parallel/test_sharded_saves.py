"""``save_sharded_inputs``: the SP-gathered block inputs kept as their sequence shard and gathered again in backward.

Single process. The packing (which saved tensors are views of a gathered input, one regather shared by every view,
the layout and DTensor spec rebuilt) runs on a 1-rank mesh with a stand-in for the gathered tensor; what the hooks
find in a real plan, the collectives they add and the memory they free run on a fake 2-rank process group (its
collectives move no data, so no gradient is compared there). Gradients through a real all-gather, equal to those of
the default at tp 2, 4 and 8, are checked by the activation benchmark (``tests/multiprocess/test_benchmarks_quick.py``
and ``python -m benchmarks activations``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from launching import fake_world
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_tp.config import ParallelConfig
from lightning_tp.errors import MeshConfigError, PlanError
from lightning_tp.models import Llama, get_config
from lightning_tp.parallel import sharded_saves
from lightning_tp.parallel.families.llama import llama_plan
from lightning_tp.parallel.parallelize import apply_tensor_parallel
from lightning_tp.parallel.plans import resolve_plan
from lightning_tp.parallel.sharded_saves import gathering_inputs, save_sharded_inputs

# ---------------------------------------------------------------------------------------------------- which inputs


def test_the_llama_plan_gathers_the_attention_and_mlp_inputs_only() -> None:
    plan = llama_plan(sequence_parallel=True, loss_parallel=True)
    gathering = {path: gathering_inputs(style) for path, style in plan.items() if gathering_inputs(style)}
    assert gathering == {"model.layers.*.self_attn": {"hidden_states": Shard(1)},
                         "model.layers.*.mlp": {0: Shard(1)}}
    # the split on entry to block 0 (Replicate -> Shard) and every style without SP gather nothing
    assert gathering_inputs(plan["model.layers.0"]) == {}
    assert not any(gathering_inputs(s) for s in llama_plan(sequence_parallel=False, loss_parallel=True).values())


def test_a_plan_that_gathers_nothing_is_refused(mesh: Any) -> None:
    model = Llama(get_config("debug"))
    plan = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
    with pytest.raises(PlanError, match="save_sharded_inputs=True found no input.*sequence_parallel=True"):
        save_sharded_inputs(model, plan, mesh)


@pytest.mark.parametrize(("fields", "wrong"), [
    ({"sequence_parallel": False}, "sequence_parallel=False"),
    ({"activation_checkpointing": "selective"}, "activation_checkpointing='selective'"),
    ({"activation_checkpointing": "full"}, "activation_checkpointing='full'"),
    ({"compile": True}, "compile=True"),
])
def test_the_option_is_refused_where_it_cannot_apply(fields: dict, wrong: str) -> None:
    with pytest.raises(MeshConfigError, match=f"save_sharded_inputs=True.*got {wrong}.*save_sharded_inputs=False"):
        ParallelConfig(save_sharded_inputs=True, **fields)
    ParallelConfig(save_sharded_inputs=False, **fields)  # the same without the option is fine
    ParallelConfig(save_sharded_inputs=True)  # the defaults (SP, no recompute, eager) take it


def test_the_strategy_passes_the_option_into_its_configuration() -> None:
    from lightning_tp import TensorParallelStrategy

    strategy = TensorParallelStrategy(tensor_parallel_size=2, save_sharded_inputs=True)
    assert strategy.parallel == ParallelConfig(tensor_parallel_size=2, save_sharded_inputs=True)
    assert strategy.save_sharded_inputs is True
    assert TensorParallelStrategy().save_sharded_inputs is False


# ---------------------------------------------------------------------------------------------------- packing


def _mark(shard: DTensor) -> tuple[DTensor, dict[int, Any]]:
    """A stand-in for the gather of ``shard`` on one rank (where DTensor's own is a no-op): a copy in new storage,
    marked as the hooks mark a gathered input."""
    gathered = DTensor.from_local(shard.to_local().clone(), shard.device_mesh, [Replicate()], run_check=False)
    local = gathered.to_local()
    source = sharded_saves._Gathered(shard, shard, sharded_saves._versions(shard), (Replicate(),), local)
    return gathered, {local.untyped_storage().data_ptr(): source}


def _three_projections(x: DTensor, weights: list[torch.Tensor]) -> torch.Tensor:
    # as q, k, v: three matmuls save views of the same input
    return sum((x.to_local() @ w).pow(2).sum() for w in weights)


def test_views_of_a_gathered_input_are_regathered_once_and_rebuilt_exactly(mesh: Any) -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 6, 8)
    weights = [torch.randn(8, n, requires_grad=True) for n in (4, 2, 2)]

    def grads(sharded: bool) -> tuple[list[torch.Tensor], torch.Tensor, list[Any]]:
        x = base.clone().requires_grad_()
        shard = DTensor.from_local(x * 1.0, mesh, [Shard(1)], run_check=False)
        gathered, marks = _mark(shard)
        packed: list[Any] = []

        def pack(t: torch.Tensor) -> Any:
            packed.append(sharded_saves._pack(marks, t))
            return packed[-1]

        hooks = (torch.autograd.graph.saved_tensors_hooks(pack, sharded_saves._unpack) if sharded
                 else contextlib.nullcontext())
        with hooks:
            # a transposed view and a 2-D view, as linear and matmul save them, at an offset into the storage
            loss = _three_projections(gathered, weights) + (gathered.to_local()[:, 1:].transpose(1, 2) ** 2).sum()
        del gathered
        for w in weights:
            w.grad = None
        loss.backward(retain_graph=True)
        first = [w.grad.clone() for w in weights] + [x.grad.clone()]
        for w in weights:
            w.grad = None
        x.grad = None
        loss.backward()  # a second backward of a retained graph unpacks every view again
        second = [w.grad for w in weights] + [x.grad]
        return first, torch.stack([a.sum() for a in second]), packed

    ref_first, ref_second, _ = grads(False)
    calls = []
    regather = sharded_saves._Gathered.regather

    def counted(self: Any) -> torch.Tensor:
        calls.append(1)
        return regather(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sharded_saves._Gathered, "regather", counted)
        first, second, packed = grads(True)
    tokens = [p for p in packed if isinstance(p, sharded_saves._Saved)]
    assert len(tokens) == 4 and len({id(t.source) for t in tokens}) == 1  # the 3 inputs and the squared view
    assert {t.offset for t in tokens} == {0, 8}  # the sliced view starts one row (8 elements) in
    assert len(calls) == 2  # one gather per backward, shared by every view
    assert tokens[0].source.regathered is None  # freed after the last view of each backward
    for got, want in zip(first, ref_first, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(second, ref_second, rtol=0, atol=0)


def test_a_tensor_that_is_not_a_gathered_view_passes_through(mesh: Any) -> None:
    shard = DTensor.from_local(torch.randn(2, 4, 8), mesh, [Shard(1)], run_check=False)
    _, marks = _mark(shard)
    other = torch.randn(3)
    assert sharded_saves._pack(marks, other) is other
    assert sharded_saves._unpack(other) is other


@pytest.mark.parametrize("change", ["dtensor", "local"])
def test_a_shard_modified_in_place_after_forward_is_an_error(mesh: Any, change: str) -> None:
    shard = DTensor.from_local(torch.randn(2, 4, 8), mesh, [Shard(1)], run_check=False)
    gathered, marks = _mark(shard)
    token = sharded_saves._pack(marks, gathered)
    assert sharded_saves._unpack(token).shape == gathered.shape  # unchanged: it regathers
    # the norm's output changed after it was gathered, through the DTensor or its local tensor
    (shard if change == "dtensor" else shard.to_local()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place.*save_sharded_inputs=False"):
        sharded_saves._unpack(sharded_saves._pack(marks, gathered))


# ---------------------------------------------------------------------------------------------------- in a plan


@pytest.fixture
def fake_two_ranks() -> Iterator[Any]:
    """Rank 0 of a fake 2-rank process group (collectives are no-ops that keep shapes) and its 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    with fake_world(0, 2):
        yield init_device_mesh("cpu", (2,))


def _one_step(model: torch.nn.Module, mesh: Any, sharded: bool, tokens: torch.Tensor,
              inputs_of: list[str]) -> tuple[dict[str, dict[str, int]], list[bool]]:
    """Collectives of forward and backward, and whether each listed projection's input is alive after forward."""
    plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=False)
    apply_tensor_parallel(model, plan, mesh)
    if sharded:
        assert len(save_sharded_inputs(model, plan, mesh)) == 2 * len(plan.blocks)
    refs: list[Any] = []
    for path in inputs_of:
        model.get_submodule(path).register_forward_pre_hook(
            lambda _m, args: refs.append(StorageWeakRef(args[0].to_local().untyped_storage())))
    counts = {}
    with CommDebugMode() as comm:
        out = model(tokens)
    counts["forward"] = dict(comm.get_comm_counts())
    logits = out if isinstance(out, torch.Tensor) else out.logits
    alive = [not ref.expired() for ref in refs]
    with CommDebugMode() as comm:
        logits.float().sum().backward()
    counts["backward"] = dict(comm.get_comm_counts())
    return {phase: {str(op).split(".")[-1]: n for op, n in c.items()} for phase, c in counts.items()}, alive


def _models() -> Iterator[tuple[str, torch.nn.Module]]:
    yield "native", Llama(get_config("debug"))
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                                      use_cache=False)
    yield "transformers", transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("which", ["native", "transformers"])
def test_in_a_plan_two_more_all_gathers_per_layer_and_no_gathered_input_kept(fake_two_ranks: Any,
                                                                           which: str) -> None:
    name, base = next((n, m) for n, m in _models() if n == which)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs_of = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    default, kept = _one_step(copy.deepcopy(base), fake_two_ranks, False, tokens, inputs_of)
    sharded, kept_sharded = _one_step(copy.deepcopy(base), fake_two_ranks, True, tokens, inputs_of)
    assert kept == [True, True] and kept_sharded == [False, False], name  # whole until backward / freed
    assert sharded["forward"] == default["forward"]
    layers = 2
    assert sharded["backward"] == {**default["backward"], "all_gather_into_tensor":
                                   default["backward"]["all_gather_into_tensor"] + 2 * layers}
