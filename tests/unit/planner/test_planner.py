"""The dry-run planner (lightning_tp/planner.py): shapes, memory and communication against independent counts."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import time

import pytest
import torch
from launching import fake_world

from lightning_tp import hardware
from lightning_tp.errors import LightningTPError, ModelShapeError
from lightning_tp.hardware import HardwareError
from lightning_tp.models import Llama, get_config, list_presets
from lightning_tp.planner import (
    PlanInputs,
    PlannerError,
    analyze,
    collectives,
    compose_inputs,
    layer_activation_bytes,
    param_shards,
    recommend,
)
from lightning_tp.planner.estimate import elementwise_bytes


def _inputs(config, tp=1, dp=1, seq_len=32, batch_size=2, **kwargs):
    return PlanInputs(config=config, tp=tp, dp=dp, seq_len=seq_len, batch_size=batch_size,
                      accelerator=hardware.get_accelerator("h100"), intra_link=hardware.get_link("nvlink4"),
                      inter_link=hardware.get_link("ib_ndr"), **kwargs)




def test_every_preset_plans_in_seconds():
    # tp=2 divides every preset's MLP width and vocabulary, and the heads of all but smollm2_135m (9 query, 3 KV
    # heads: its attention projections are replicated, whole on both TP ranks).
    for name in list_presets():
        start = time.perf_counter()
        inputs, _ = compose_inputs([f"model={name}", "strategy.tensor_parallel_size=2",
                                    "strategy.data_parallel_size=4", "data.seq_len=2048"])
        report = analyze(inputs)
        elapsed = time.perf_counter() - start
        assert elapsed < 10, f"{name} took {elapsed:.1f} s"  # ~0.3-1 s each on a loaded 2-core machine
        assert report.estimate["step_s"] > 0 and report.recommendation
        stored = report.ranks[0]["stored_parameters_padded"]
        # Every parameter is stored once across the 8 ranks (up to FSDP2 padding), a replicated one once per TP rank.
        cfg = inputs.config
        once = cfg.num_params
        if cfg.num_attention_heads % 2:
            once += cfg.num_hidden_layers * cfg.hidden_size * cfg.resolved_head_dim * 2 * (
                cfg.num_attention_heads + cfg.num_key_value_heads)
        assert once <= stored * 8 < once * 1.01 + 8 * 4096


@pytest.mark.parametrize("tp,dp", [(2, 3), (4, 1), (1, 4)])
def test_shard_shapes_equal_a_model_sharded_under_a_fake_process_group(tp, dp):
    """The analytic per-rank shapes equal what parallelize_module + fully_shard give, on every checked rank;
    dp=3 makes FSDP2 chunks uneven (64 rows → 22, 22, 20) so padding is exercised."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tp.parallel.fsdp import apply_fsdp
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    config = get_config("debug").replace(tie_word_embeddings=True)  # a tied weight is counted once
    inputs = _inputs(config, tp=tp, dp=dp)
    shards = {p.name: p for p in param_shards(inputs)}
    for rank in sorted({0, tp * dp - 1, tp * dp // 2}):
        with fake_world(rank, tp * dp):
            mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
            with torch.device("meta"):
                model = Llama(config)
            plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
            apply_tensor_parallel(model, plan, mesh["tensor_parallel"])
            units = apply_fsdp(model, plan, mesh["data_parallel"])
            real = dict(model.named_parameters())
            assert set(real) == set(shards)
            for name, param in real.items():
                expected = shards[name].local_shape(tp, dp, rank % tp, rank // tp)
                assert tuple(param.to_local().shape) == expected, (name, rank)
            padded = sum(math.prod(fp.padded_sharded_param_size) for unit in units
                         for fp in unit._get_fsdp_state()._fsdp_param_group.fsdp_params)
            assert padded == sum(p.padded_shard for p in shards.values())
    # Memory of the parameters: fp32 master shards under bf16-mixed.
    report = analyze(inputs, top=0)
    assert report.memory["parameters"] == 4 * padded
    assert report.memory["optimizer (AdamW)"] == 8 * padded


_HEADS = {"even": {}, "9:3": dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, head_dim=16),
          "8:2": dict(num_key_value_heads=2)}


@pytest.mark.parametrize("tp,sp,heads", [(1, True, "even"), (2, True, "even"), (2, False, "even"), (2, True, "9:3"),
                                         (4, False, "9:3"), (4, True, "8:2")])
def test_activation_formula_equals_saved_tensors(tp, sp, heads):
    """Bytes autograd saves in one real decoder layer (bf16, TP-sharded under a fake process group) equal the
    formula, including the whole all-gathered inputs the colwise projections keep under SP and, for heads tp does
    not divide (9:3 at tp 2 and 4: q/k/v/o replicated; 8:2 at tp 4: k/v replicated), the busiest rank's heads, KV
    copies and the selected weight rows the matmuls save (rank 0 holds the most heads)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    config = get_config("debug").replace(num_hidden_layers=1, **_HEADS[heads])
    b, s = 2, 32
    with fake_world(0, tp):
        torch.manual_seed(0)
        model = Llama(config).to(torch.bfloat16)
        if tp > 1:
            plan = resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=True)
            apply_tensor_parallel(model, plan, init_device_mesh("cpu", (tp,)))
        freqs = torch.outer(torch.arange(s).float(), model.model.inv_freq)
        emb = torch.cat((freqs, freqs), -1)
        rope = (emb.cos().bfloat16(), emb.sin().bfloat16())

        def storage(t):
            return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()

        skip = {storage(p).data_ptr() for p in model.parameters()} | {storage(t).data_ptr() for t in rope}
        # the head index of a replicated projection is part of the module (made once), not an activation
        skip |= {m.head_index.untyped_storage().data_ptr() for m in model.modules() if hasattr(m, "head_index")}
        saved = {}

        def pack(t):
            st = storage(t)
            if st.data_ptr() not in skip:
                saved[st.data_ptr()] = st.nbytes()
            return t

        x = torch.randn(b, s, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model.layers[0](x, position_embeddings=rope)
    inputs = _inputs(config, tp=tp, seq_len=s, batch_size=b, sequence_parallel=sp)
    assert sum(saved.values()) == sum(layer_activation_bytes(inputs).values())


def test_activation_checkpointing_modes_order_memory_and_time():
    inputs, _ = compose_inputs(["model=llama3_8b", "strategy.tensor_parallel_size=2", "strategy.data_parallel_size=4"])
    per_layer = {ac: sum(layer_activation_bytes(inputs, ac).values()) for ac in ("none", "selective", "full")}
    assert per_layer["none"] > per_layer["selective"] > per_layer["full"]
    e, h = inputs.tokens, inputs.config.hidden_size
    assert per_layer["full"] == 2 * e * h // 2  # the bf16 block input, sequence-sharded
    steps = {ac: analyze(inputs.replace(activation_checkpointing=ac), top=0).estimate for ac in ("none", "full")}
    assert steps["full"]["hardware_flops_per_token"] > steps["none"]["hardware_flops_per_token"]
    assert steps["full"]["model_flops_per_token"] == steps["none"]["model_flops_per_token"]


@pytest.mark.parametrize("sp", [True, False])
def test_tp_communication_equals_megatron(sp):
    """Per layer per micro-batch: 2+2 all-reduces (TP) or 2+2 all-gathers and reduce-scatters each way (SP);
    8·b·s·h·(t−1)/t elements sent per rank either way (Narayanan et al. 2021)."""
    config, t, b, s, m = get_config("llama3_8b"), 4, 2, 1024, 3
    inputs = _inputs(config, tp=t, dp=2, seq_len=s, batch_size=b, sequence_parallel=sp, accumulate=m)
    layer_rows = [c for c in collectives(inputs) if c.where.startswith("decoder layers")]
    layers = config.num_hidden_layers
    kinds = {c.kind: c.calls for c in layer_rows}
    assert kinds == ({"all_gather": 4 * layers * m, "reduce_scatter": 4 * layers * m} if sp
                     else {"all_reduce": 4 * layers * m})
    sent = sum(c.bytes_per_rank for c in layer_rows)
    assert sent == pytest.approx(m * layers * 8 * b * s * config.hidden_size * (t - 1) / t * 2)  # bf16
    loss = [c for c in collectives(inputs) if "cross entropy" in c.where]
    assert loss[0].calls == 3 * m and loss[0].tensor_bytes == 4 * b * s


def test_fsdp_communication_equals_parameter_count():
    config, dp = get_config("llama3_8b"), 8
    inputs = _inputs(config, tp=1, dp=dp, seq_len=1024, batch_size=1)
    rows = {(c.kind, c.where.split(",")[-1].split(" (")[0].strip()): c for c in collectives(inputs)}
    ag_fwd = rows[("all_gather", "forward")]
    rs = rows[("reduce_scatter", "gradients")]
    # Every dimension divides 8, so no padding: ring all-gather of bf16 params, reduce-scatter of fp32 grads.
    assert ag_fwd.bytes_per_rank == pytest.approx(2 * config.num_params * (dp - 1) / dp)
    assert rs.bytes_per_rank == pytest.approx(4 * config.num_params * (dp - 1) / dp)
    assert ag_fwd.calls == config.num_hidden_layers + 1  # one unit per block and the root


def test_estimates_lie_within_a_band_of_published_torchtitan_figures():
    """A model, not a measurement: within 0.5x-2x of torchtitan's H100 tokens/s per GPU (docs/planner.md)."""
    inputs, _ = compose_inputs(["model=llama3_8b", "strategy.tensor_parallel_size=1", "strategy.data_parallel_size=8",
                                "strategy.activation_checkpointing=selective"])
    eight = analyze(inputs, top=0).estimate
    assert 0.5 < eight["tokens_per_s_per_device"] / 5762 < 2
    assert 0.25 < eight["mfu"] < 0.6
    inputs, _ = compose_inputs(["model=llama3_70b", "strategy.tensor_parallel_size=8",
                                "strategy.data_parallel_size=32", "strategy.activation_checkpointing=full"])
    seventy = analyze(inputs, top=0)
    assert 0.5 < seventy.estimate["tokens_per_s_per_device"] / 829 < 2
    assert all(c["link"] == ("nvlink4" if c["group"] == "tp" else "ib_ndr") for c in seventy.communication)


def test_float8_speeds_up_block_matmuls_and_async_tp_hides_layer_collectives():
    base, _ = compose_inputs(["model=llama3_70b", "strategy.tensor_parallel_size=8", "strategy.data_parallel_size=2"])
    plain = analyze(base, top=0).estimate
    fp8 = analyze(base.replace(float8=True), top=0).estimate
    overlapped = analyze(base.replace(async_tp=True, compile=True), top=0).estimate
    cfg = base.config
    block = cfg.num_params - cfg.vocab_size * cfg.hidden_size * 2 - cfg.hidden_size  # norms are negligible
    saved = base.tokens / base.tp * 6 * block / 2 / (989e12 * base.efficiency)  # half the matmul time at 2x peak
    casts = elementwise_bytes(base.replace(float8=True))["float8 casts"] / base.accelerator.hbm_bandwidth
    assert plain["compute_s"] - fp8["compute_s"] == pytest.approx(saved - casts, rel=1e-3)
    outside = [c.seconds for c in collectives(base) if c.group == "tp" and not c.where.startswith("decoder")]
    assert overlapped["tp_comm_s"] == pytest.approx(sum(outside)) and plain["tp_comm_s"] > 10 * sum(outside)


def test_recommendation_fits_and_is_ranked():
    inputs, _ = compose_inputs(["model=llama3_70b", "strategy.tensor_parallel_size=8",
                                "strategy.data_parallel_size=4"])
    ranked = recommend(inputs, top=50)
    budget = 0.9 * inputs.accelerator.memory_bytes
    assert all(c.tp * c.dp == 32 and 64 % c.tp == 0 and 8 % c.tp == 0 for c in ranked)
    assert all((c.memory <= budget) == c.fits for c in ranked)
    fitting = [c for c in ranked if c.fits]
    assert fitting and fitting[0].tokens_per_s_per_device == max(c.tokens_per_s_per_device for c in fitting)
    assert not any(c.activation_checkpointing == "none" and c.tp == 1 for c in fitting)  # 70B, 8k tokens: too big


def test_bad_inputs_raise_typed_errors_naming_value_and_fix():
    with pytest.raises(HardwareError, match=r"'h1000'.*Did you mean 'h100'"):
        compose_inputs(["accelerator=h1000"])
    with pytest.raises(PlannerError, match="nonsense"):
        compose_inputs(["nonsense=1"])
    with pytest.raises(PlannerError, match=r"trainer\.foo"):
        compose_inputs(["trainer.foo=1"])
    with pytest.raises(PlannerError, match=r"strategy.activation_checkpointing='sometimes'.*none, selective, full"):
        compose_inputs(["strategy.activation_checkpointing=sometimes"])
    with pytest.raises(PlannerError, match=r"data\.seq_len=1001.*multiple of 8"):
        compose_inputs(["data.seq_len=1001"])
    with pytest.raises(PlannerError, match=r"llama3_9b.*Valid names"):
        compose_inputs(["model.name=llama3_9b"])
    with pytest.raises(PlannerError, match=r"strategy.float8=true but accelerator='a100' has no 'fp8' peak"):
        compose_inputs(["strategy.float8=true", "accelerator=a100"])
    with pytest.raises(PlannerError, match=r"strategy.async_tp=true with tensor_parallel_size=1"):
        compose_inputs(["strategy.async_tp=true", "strategy.tensor_parallel_size=1"])
    inputs, _ = compose_inputs(["model=llama3_8b", "strategy.tensor_parallel_size=3", "strategy.data_parallel_size=1",
                                "data.seq_len=3072"])
    with pytest.raises(ModelShapeError, match="tensor_parallel_size=3"):
        analyze(inputs)
    assert issubclass(PlannerError, LightningTPError) and issubclass(HardwareError, LightningTPError)


def test_hardware_file_adds_an_accelerator(tmp_path):
    spec = tmp_path / "hw.yaml"
    spec.write_text("links:\n  - {name: test_fabric, bandwidth: 100.0e9, efficiency: 0.5}\n"
                    "accelerators:\n  - {name: test_gpu, peak_flops: {bf16: 500.0e12}, memory_gib: 40,"
                    " hbm_bandwidth: 2.0e12, devices_per_node: 4, intra_node_link: test_fabric,"
                    " inter_node_link: ib_ndr}\n")
    inputs, _ = compose_inputs([f"hardware_file={spec}", "accelerator=test_gpu", "model=llama3_1b"])
    assert (inputs.tp, inputs.dp, inputs.intra_link.name) == (4, 1, "test_fabric")
    report = analyze(inputs, top=0)
    assert report.inputs["device_memory"] == 40 * 2**30
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"links": [{"name": "x", "bandwidth": 1e9, "speed": 3}]}))
    with pytest.raises(HardwareError, match=r"unknown fields \['speed'\]"):
        hardware.load_hardware(bad)


def test_cli_prints_the_tables_and_json():
    from lightning_tp.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["plan", "model=llama3_8b", "strategy.tensor_parallel_size=2", "strategy.data_parallel_size=4"])
    text = out.getvalue()
    for heading in ("Applied plan", "Memory per rank", "Activations saved per decoder layer",
                    "Communication per optimizer step", "Estimate", "Recommendation"):
        assert heading in text
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj +ColwiseParallel .* \[4096, 4096\] +\[2048, 4096\] +"
                     r"\[512, 4096\]", text)  # global, tp-local (tp=2), rank 0 after FSDP2 over dp=4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["plan", "model=debug", "strategy.tensor_parallel_size=2", "strategy.data_parallel_size=2",
              "data.seq_len=64", "--json"])
    data = json.loads(out.getvalue())
    assert data["inputs"]["world"] == 4 and data["estimate"]["mfu"] > 0
    with pytest.raises(SystemExit, match=r"ModelShapeError: .*tensor_parallel_size=3") as failure:
        main(["plan", "model=llama3_8b", "strategy.tensor_parallel_size=3", "strategy.data_parallel_size=1",
              "data.seq_len=3072"])
    assert isinstance(failure.value.__cause__, ModelShapeError)


def test_kv_heads_fewer_than_tp_are_replicated_and_their_gradients_all_reduced() -> None:
    """The debug Llama has 4 KV heads: at tp 8 the plan replicates k_proj/v_proj (lightning_tp.parallel.kv_heads);
    the planner keeps them whole on every rank and adds one all-reduce of each weight gradient per layer."""
    config = get_config("debug")
    for tp, replicated in ((4, False), (8, True)):
        inputs = _inputs(config, tp=tp, seq_len=32)
        shards = {p.name: p for p in param_shards(inputs)}
        (k,) = [p for name, p in shards.items() if name.endswith("layers.0.self_attn.k_proj.weight")]
        assert k.tp_shape == (k.shape if replicated else (k.shape[0] // tp, k.shape[1])), (tp, k)
        rows = [c for c in collectives(inputs) if "k_proj/v_proj" in c.where]
        if not replicated:
            assert rows == []
            continue
        (row,) = rows
        element = 2  # bf16-mixed under FSDP2: the layer multiplies by the bf16 unsharded weight, so its gradient
        # (and the all-reduce in lightning_tp.parallel.heads._Select.backward) is bf16; FSDP2 upcasts only after
        assert row.kind == "all_reduce" and row.group == "tp"
        assert row.calls == 2 * config.num_hidden_layers
        kv_weight = config.num_key_value_heads * config.resolved_head_dim * config.hidden_size
        assert row.tensor_bytes == kv_weight * element


# Issue 14: head counts and vocabularies tp does not divide. The shapes of SmolLM2-135M and TinyLlama-1.1B.
_SMOLLM2 = dict(hidden=576, heads=9, kv=3, head_dim=64, inter=1536, layers=30, vocab=49152)
_BYTES = 4 + 4 + 8  # bf16-mixed per parameter element: fp32 master, fp32 gradient, two fp32 AdamW moments


def _tinyllama(**changes):
    return get_config("llama2_7b").replace(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                           num_key_value_heads=4, **changes)


def test_smollm2_preset_has_the_published_shapes():
    cfg = get_config("smollm2_135m")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings) == (
        576, 9, 3, 64, 1536, 30, 49152, True)
    assert cfg.num_params == 134_515_008  # SmolLM2-135M's model card count


@pytest.mark.parametrize("tp,q_max", [(2, 5), (4, 3)])
def test_smollm2_waste_replicated_projections_all_reduces_memory_and_imbalance(tp, q_max):
    from lightning_tp.planner.estimate import rank_flops

    s = _SMOLLM2
    inputs = _inputs(get_config("smollm2_135m"), tp=tp, seq_len=1024, batch_size=1)
    report = analyze(inputs, top=0)
    w = report.waste
    assert [r["projections"] for r in w["replicated"]] == ["q_proj/o_proj", "k_proj/v_proj"]
    assert f"9 query heads at tp {tp}" in w["replicated"][0]["reason"]
    assert w["all_reduces_per_layer"] == 4 and w["all_reduces_per_step"] == 4 * s["layers"]
    # Memory beyond the even split: q/k/v/o whole on every rank instead of 1/tp of them.
    attention = (2 * s["heads"] + 2 * s["kv"]) * s["head_dim"] * s["hidden"]
    extra = _BYTES * s["layers"] * attention * (1 - 1 / tp)
    assert w["memory_bytes"]["replicated projections (params+grads+AdamW)"] == pytest.approx(extra)
    assert w["memory_bytes"]["vocabulary imbalance (params+grads+AdamW)"] == 0
    # ... and the parameters the planner stores are the even split plus exactly that.
    h = s["hidden"]
    even = (s["vocab"] * h + s["layers"] * (attention + 3 * h * s["inter"]) + (2 * s["layers"] + 1) * h * tp) / tp
    assert report.memory["parameters"] == pytest.approx(4 * even + extra * 4 / _BYTES)
    # All-reduces of the bf16 weight gradients (FSDP2's param_dtype), ring: 2 (t-1)/t of each.
    assert w["all_reduce_bytes_per_rank"] == pytest.approx(2 * (tp - 1) / tp * s["layers"] * attention * 2)
    # The busiest rank: ceil(9 / tp) query heads, one KV copy per query head; 11 % / 33 % over 9 / tp.
    assert (w["q_heads"], w["kv_heads"]) == (q_max, q_max)
    assert w["head_imbalance"] == pytest.approx(q_max / (9 / tp) - 1)
    # Extra compute: the heads and KV copies beyond 9/tp and 3/tp, in the matmuls and in attention.
    d, seq, layers = s["head_dim"], 1024, s["layers"]
    flops = (6 * layers * h * d * (2 * (q_max - 9 / tp) + 2 * (q_max - 3 / tp))
             + 12 * layers * (q_max - 9 / tp) * d * seq)
    seconds = seq * flops / (989e12 * inputs.efficiency)
    assert w["compute_extra_s"] == pytest.approx(seconds, rel=1e-9)
    # The step estimate uses the busiest rank: tp times its FLOPs exceed the even split's by tp times that.
    even_flops = sum(rank_flops(inputs.replace(tp=1)))  # tp 1 executes exactly the even work once
    assert report.estimate["hardware_flops_per_token"] - even_flops == pytest.approx(tp * flops, rel=1e-9)
    comm = [c for c in report.communication if c["where"].startswith("replicated ")]
    assert w["all_reduce_s"] == pytest.approx(sum(c["seconds"] for c in comm)) and w["all_reduce_s"] > 0


def test_tinyllama_at_tp_8_replicates_kv_and_tp_4_wastes_least():
    from lightning_tp.planner.waste import least_waste

    cfg = _tinyllama()
    inputs = _inputs(cfg, tp=8, seq_len=2048, batch_size=1)
    w = analyze(inputs, top=0).waste
    assert [r["projections"] for r in w["replicated"]] == ["k_proj/v_proj"]
    assert "4 KV heads at tp 8: fewer KV heads than ranks" in w["replicated"][0]["reason"]
    assert w["all_reduces_per_layer"] == 2 and w["all_reduces_per_step"] == 2 * 22
    kv = 2 * 4 * 64 * 2048
    assert w["memory_bytes"]["replicated projections (params+grads+AdamW)"] == pytest.approx(_BYTES * 22 * kv * 7 / 8)
    assert (w["q_heads"], w["head_imbalance"], w["kv_heads"], w["kv_heads_even"]) == (4, 0, 1, 0.5)
    assert w["vocab_rows"] == 4000 and w["vocab_imbalance"] == 0
    # The same node: tp 1, 2 and 4 waste nothing (ties go to the larger tp), tp 8 replicates k_proj/v_proj.
    least = least_waste(inputs)
    assert least["tp"] == 4
    assert least["reason"].startswith("tp 4: no waste")
    assert "tp 8 would waste more: replicates k_proj/v_proj (4 KV heads at tp 8" in least["reason"]
    scores = {row["tp"]: row["score"] for row in least["by_tp"]}
    assert scores[1] == scores[2] == scores[4] == 0 < scores[8]


@pytest.mark.parametrize("vocab,tp,rows", [(32001, 4, 8001), (259, 4, 65)])
def test_uneven_vocabulary_costs_the_largest_shard(vocab, tp, rows):
    """torch.chunk rows (65, 65, 65, 64 for 259 at tp 4): the busiest rank holds ceil(V/tp) rows, no padding."""
    from lightning_tp.planner.waste import least_waste

    cfg = _tinyllama(vocab_size=vocab) if vocab > 1000 else get_config("debug").replace(vocab_size=vocab)
    h = cfg.hidden_size
    inputs = _inputs(cfg, tp=tp, seq_len=64, batch_size=2)
    report = analyze(inputs, top=0)
    w = report.waste
    assert (w["vocab_rows"], w["vocab_rows_even"]) == (rows, vocab / tp)
    assert w["vocab_imbalance"] == pytest.approx(rows * tp / vocab - 1)
    assert w["replicated"] == [] and w["all_reduces_per_step"] == 0
    extra = _BYTES * 2 * (rows - vocab / tp) * h  # embed_tokens and the untied lm_head
    assert w["memory_bytes"]["vocabulary imbalance (params+grads+AdamW)"] == pytest.approx(extra)
    shards = {p.name: p for p in param_shards(inputs)}
    assert shards["lm_head.weight"].tp_shape == (rows, h) and shards["model.embed_tokens.weight"].tp_shape == (rows, h)
    assert report.memory["logits (fp32 log-probs)"] == 4 * 128 * rows  # loss parallel: the rank's vocab rows
    if vocab == 32001:  # 0.002 % waste at tp 4 ties with none (to 0.01 %); tp 8 would replicate k_proj/v_proj
        assert least_waste(inputs)["tp"] == 4


@pytest.mark.parametrize("fsdp", [True, False])
def test_replicated_gradient_all_reduces_equal_what_the_layers_send(fsdp, monkeypatch):
    """The debug Llama at tp 8 (4 KV heads: k_proj/v_proj replicated), bf16-mixed: the all-reduces the replicated
    projections really issue in backward (counted under a fake process group) have the planner's count and size.
    Under FSDP2 the layer multiplies by the bf16 unsharded weight, so the gradient summed over TP is bf16; without
    FSDP it is the fp32 parameter's."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tp.parallel import heads
    from lightning_tp.parallel.fsdp import apply_fsdp, mixed_precision_policy
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    config = get_config("debug")
    sent = []
    real_all_reduce = heads.dist.all_reduce
    monkeypatch.setattr(heads.dist, "all_reduce",
                        lambda t, **kw: sent.append(t.numel() * t.element_size()) or real_all_reduce(t, **kw))
    with fake_world(0, 8):
        mesh = init_device_mesh("cpu", (1, 8), mesh_dim_names=("data_parallel", "tensor_parallel"))
        torch.manual_seed(0)
        model = Llama(config)
        plan = resolve_plan(model, "auto", sequence_parallel=False, loss_parallel=False)
        apply_tensor_parallel(model, plan, mesh["tensor_parallel"])
        if fsdp:
            apply_fsdp(model, plan, mesh["data_parallel"], mixed_precision_policy("bf16-mixed"))
            model(torch.zeros(1, 8, dtype=torch.long)).float().sum().backward()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(torch.zeros(1, 8, dtype=torch.long)).float().sum().backward()
    inputs = _inputs(config, tp=8, seq_len=8, batch_size=1, sequence_parallel=False, loss_parallel=False, fsdp=fsdp)
    (row,) = [c for c in collectives(inputs) if c.where.startswith("replicated ")]
    assert row.calls == len(sent) == 2 * config.num_hidden_layers
    assert row.tensor_bytes * row.calls == sum(sent)
    assert row.tensor_bytes == config.num_key_value_heads * config.resolved_head_dim * config.hidden_size * (
        2 if fsdp else 4)


@pytest.mark.parametrize("sharded", [False, True])
def test_sharded_saves_formula_equals_the_activations_benchmark(sharded):
    """The rows tp+sp and tp+sp+sharded of benchmarks/activations.py (bytes alive after forward, 2-layer minus
    1-layer model, and the collectives of forward and backward) at tp 4, run under a fake process group: the planner's
    layer equals the bytes held, and save_sharded_inputs adds 2 all-gathers per layer in backward."""
    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks import activations as bench
    from benchmarks._common import bench_config

    t, b, s = 4, 1, 64
    config = bench_config("activations")
    with fake_world(0, t):
        mesh = init_device_mesh("cpu", (1, t), mesh_dim_names=("dp", "tp"))["tp"]
        one, two = (bench._forward_bytes(config.replace(num_hidden_layers=n), mesh, True, "none", b, s, sharded)
                    for n in (1, 2))
    inputs = _inputs(config, tp=t, seq_len=s, batch_size=b, sequence_parallel=True, save_sharded_inputs=sharded)
    parts = layer_activation_bytes(inputs)
    assert two["held"] - one["held"] == sum(parts.values())
    e, h = b * s, config.hidden_size
    if sharded:
        assert parts["2 norm outputs (sequence shards, regathered in backward)"] == 2 * 2 * e * h // t
    else:
        assert parts["2 gathered norm outputs (whole)"] == 2 * 2 * e * h

    def gathers(run, phase):
        return run["collectives"][phase].get("all_gather_into_tensor", 0)

    backward = gathers(two, "backward") - gathers(one, "backward")
    assert backward == (4 if sharded else 2)
    planned = sum(c.calls for c in collectives(inputs) if c.kind == "all_gather" and c.where.startswith("decoder"))
    assert planned == config.num_hidden_layers * (gathers(two, "forward") - gathers(one, "forward") + backward)


def test_sharded_saves_transient_validation_and_ranking():
    # a small vocabulary, so that the regathered input (a·E·h) outweighs the loss backward's transient (8·E·V/t)
    base, _ = compose_inputs(["model=llama3_8b", "model.vocab_size=1024", "strategy.tensor_parallel_size=8",
                              "strategy.data_parallel_size=1"])
    sharded = base.replace(save_sharded_inputs=True)
    a, e, h, t = 2, base.tokens, base.config.hidden_size, 8
    plain_layer, sharded_layer = (sum(layer_activation_bytes(x).values()) for x in (base, sharded))
    assert plain_layer - sharded_layer == 2 * a * e * h * (t - 1) // t
    report = analyze(sharded, top=0)
    transient = report.memory["transient (max of loss backward, one layer's recompute)"]
    assert 8 * e * base.config.vocab_size // t < a * e * h == transient
    assert analyze(base, top=0).memory["transient (max of loss backward, one layer's recompute)"] < transient
    # 2 more exposed all-gathers per layer, no recompute: the step grows by exactly their time
    extra = [c.seconds for c in collectives(sharded) if c.where.startswith("decoder") and c.kind == "all_gather"][0]
    extra -= [c.seconds for c in collectives(base) if c.where.startswith("decoder") and c.kind == "all_gather"][0]
    steps = analyze(base, top=0).estimate["step_s"], report.estimate["step_s"]
    assert steps[1] - steps[0] == pytest.approx(extra, rel=1e-6) and extra > 0
    assert report.estimate["hardware_flops_per_token"] == analyze(base, top=0).estimate["hardware_flops_per_token"]
    # the strategy's rule, through ParallelConfig.problems
    with pytest.raises(PlannerError, match=r"save_sharded_inputs=True.*activation_checkpointing='selective'"):
        compose_inputs(["strategy.save_sharded_inputs=true", "strategy.activation_checkpointing=selective"])
    # recommend tries none, none + sharded inputs, selective, full at every tp > 1 (SP, eager)
    ranked = recommend(base, top=100)
    at8 = [c.setting for c in ranked if c.tp == 8]
    assert sorted(at8) == sorted(["none", "none + sharded inputs", "selective", "full"])
    assert not any(c.save_sharded_inputs for c in ranked if c.tp == 1)


def test_sharded_saves_shard_lora_a_inputs_too():
    """Under LoRA the adapters' lora_A keep the gathered norm output (lightning_tp/parallel/lora.py);
    save_sharded_inputs packs every saved tensor on that storage as the shard, so the bytes alive after one PEFT
    decoder layer's forward (TP 2 + SP, fake process group, dropout 0.1) drop by what the formula drops:
    2·a·E·h·(1 − 1/t)."""
    peft = pytest.importorskip("peft")
    import gc

    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks.activations import _storage_key, _StorageTracker
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan
    from lightning_tp.parallel.sharded_saves import save_sharded_inputs
    from lightning_tp.planner.inputs import Lora

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    config, t, b, s = get_config("debug").replace(num_hidden_layers=1), 2, 2, 32
    held, planned = {}, {}
    with fake_world(0, t):
        mesh = init_device_mesh("cpu", (t,))
        for sharded in (False, True):
            torch.manual_seed(0)
            model = peft.get_peft_model(Llama(config), peft.LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(targets))).to(torch.bfloat16)
            plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
            apply_tensor_parallel(model, plan, mesh)
            if sharded:
                save_sharded_inputs(model, plan, mesh)
            inner = model.base_model.model
            freqs = torch.outer(torch.arange(s).float(), inner.model.inv_freq)
            emb = torch.cat((freqs, freqs), -1)
            rope = (emb.cos().bfloat16(), emb.sin().bfloat16())
            x = torch.randn(b, s, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
            static = {_storage_key(p) for p in [*model.parameters(), *model.buffers(), *rope, x]}
            tracker = _StorageTracker()
            with tracker.mode:
                out = inner.model.layers[0](x, position_embeddings=rope)
            gc.collect()
            held[sharded] = tracker.alive_bytes(static)
            del out
            inputs = _inputs(config, tp=t, seq_len=s, batch_size=b, sequence_parallel=True, save_sharded_inputs=sharded,
                             lora=Lora(rank=4, dropout=0.1, target_modules=targets))
            planned[sharded] = layer_activation_bytes(inputs)
    e, h = b * s, config.hidden_size
    assert held[False] - held[True] == sum(planned[False].values()) - sum(planned[True].values()) \
        == 2 * 2 * e * h * (t - 1) // t
    assert planned[True]["norm outputs kept for lora_A (sequence shards)"] == 2 * 2 * e * h // t


def test_verdict_offers_sharded_inputs_before_recompute():
    """Llama 3 70B at tp 8 x dp 4, seq 8192: without recompute it does not fit, with the sequence shards kept it does
    (17.5 GiB less: 2·a·E·h·(1 − 1/t) per layer, 80 layers), so the verdict names that before selective."""
    inputs, _ = compose_inputs(["model=llama3_70b", "strategy.tensor_parallel_size=8", "strategy.data_parallel_size=4"])
    plain, sharded = analyze(inputs, top=0), analyze(inputs.replace(save_sharded_inputs=True), top=0)
    e, h, layers = inputs.tokens, inputs.config.hidden_size, inputs.config.num_hidden_layers
    saved = sum(plain.memory.values()) - sum(sharded.memory.values())
    assert saved == layers * 2 * 2 * e * h * 7 // 8
    assert "does not fit" in plain.verdict and "none and strategy.save_sharded_inputs=true" in plain.verdict
    assert ": fits" in sharded.verdict and "and sharded inputs" in sharded.verdict
