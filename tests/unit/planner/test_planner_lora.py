"""LoRA in the dry-run planner (``lightning-tp plan peft=lora``): the frozen base, the adapters' shards, what a layer
keeps for backward and what the step costs, against PEFT's own models (on the meta device, and real bf16 layers
sharded under a fake process group) and against hand-computed numbers."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from pathlib import Path

import pytest
import torch
from launching import fake_world

from lightning_tp import hardware
from lightning_tp.models import Llama, get_config
from lightning_tp.parallel.lora import keep_dropout_masks
from lightning_tp.planner import PlanInputs, PlannerError, analyze, collectives, compose_inputs, main, param_shards
from lightning_tp.planner import layout as planner_layout
from lightning_tp.planner.estimate import adapter_flops, model_flops_per_token, rank_flops
from lightning_tp.planner.inputs import Lora
from lightning_tp.planner.layout import adapters
from lightning_tp.planner.memory import FROZEN_BASE, layer_activation_bytes

peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_HEADS = {"even": {}, "9:3": dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, head_dim=16)}


def _inputs(config, tp=1, dp=1, seq_len=32, batch_size=2, lora=None, **kwargs):
    return PlanInputs(config=config, tp=tp, dp=dp, seq_len=seq_len, batch_size=batch_size,
                      accelerator=hardware.get_accelerator("h100"), intra_link=hardware.get_link("nvlink4"),
                      inter_link=hardware.get_link("ib_ndr"), lora=lora, **kwargs)




def _peft_model(model, rank, targets, dropout=0.0):
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                      target_modules=list(targets)))


def _planner_name(peft_name: str) -> str:
    """PEFT's parameter name → the planner's (the base model's own, adapters as ``<module>.lora_A.default.weight``)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


# ----------------------------------------------------------------------------------------- parameters


def test_adapter_count_equals_peft_on_llama3_70b():
    """Trainable parameters of PEFT's own LoRA model (the native Llama 3 70B on the meta device, r=16, every
    projection) equal the planner's adapters: 207,093,760, 0.29 % of the model."""
    config = get_config("llama3_70b")
    with torch.device("meta"):
        model = _peft_model(Llama(config), 16, TARGETS)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs = _inputs(config, tp=8, seq_len=8192, batch_size=1, lora=Lora(rank=16))
    found = adapters(inputs)
    assert len(found) == len([m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)])
    assert sum(math.prod(x.a.shape) + math.prod(x.b.shape) for x in found) == expected == 207_093_760
    report = analyze(inputs, top=0)
    assert report.lora["trainable_parameters"] == expected
    assert report.lora["adapted_projections"] == 80 * 7


def test_checkpoint_with_peft_lora_counts_peft_and_equals_the_preset_path(tmp_path: Path):
    """``checkpoint=<hf dir> peft=lora``: the adapters of transformers' Llama (two targets, r=8) counted by PEFT on
    the meta device equal the planner's; memory and communication equal the native preset path of the same
    config."""
    import transformers

    shapes = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    directory = tmp_path / "llama"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**shapes, "model_type": "llama"}))
    with torch.device("meta"):
        model = _peft_model(transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model("llama", **shapes)), 8, ["q_proj", "v_proj"])
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = ["strategy.tensor_parallel_size=4", "strategy.data_parallel_size=2", "data.seq_len=1024", "top=0",
             "peft=lora", "peft.rank=8", "peft.target_modules=[q_proj,v_proj]"]
    inputs, _ = compose_inputs([f"checkpoint={directory}", *sizes])
    report = analyze(inputs, top=0)
    assert report.lora["trainable_parameters"] == expected
    assert report.lora["adapted_per_layer"] == ["q_proj", "v_proj"]
    same = analyze(inputs.replace(checkpoint=None), top=0)
    assert report.memory == same.memory and report.communication == same.communication
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([f"checkpoint={directory}", *sizes, "--json"])
    data = json.loads(out.getvalue())
    assert data["lora"]["trainable_parameters"] == expected and data["memory"][FROZEN_BASE] > 0
    assert data["verdict"].startswith("LoRA (r=8, 2 projections per layer, dropout 0.05) on llama (llama)")


@pytest.mark.parametrize("tp,dp", [(2, 3), (4, 1)])
def test_lora_shard_shapes_equal_a_peft_model_sharded_under_a_fake_process_group(tp, dp):
    """PEFT's model on the meta device, sharded by the strategy itself (apply_tensor_parallel with the adapters'
    styles, apply_fsdp leaving the frozen base out): every parameter's local shape and trainability equal the
    planner's, FSDP2 holds exactly the adapters (padded sizes equal), and the trainable parameters left whole over
    tp (one gradient all-reduce each per step) are one factor per adapter, of the planner's sizes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate

    from lightning_tp.parallel.fsdp import apply_fsdp
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    config = get_config("debug")
    inputs = _inputs(config, tp=tp, dp=dp, lora=Lora(rank=4))
    shards = {p.name: p for p in param_shards(inputs)}
    for rank in sorted({0, tp * dp - 1}):
        with fake_world(rank, tp * dp):
            mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
            with torch.device("meta"):
                model = _peft_model(Llama(config), 4, TARGETS)
            plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
            apply_tensor_parallel(model, plan, mesh["tensor_parallel"])
            units = apply_fsdp(model, plan, mesh["data_parallel"], shard_frozen=False)
            real = {_planner_name(n): p for n, p in model.named_parameters()}
            assert set(real) == set(shards)
            for name, param in real.items():
                local = param.to_local() if hasattr(param, "to_local") else param
                assert tuple(local.shape) == shards[name].local_shape(tp, dp, rank % tp, rank // tp), (name, rank)
                assert param.requires_grad == shards[name].trainable, name
            managed = [fp for unit in units if unit._get_fsdp_state()._fsdp_param_group is not None
                       for fp in unit._get_fsdp_state()._fsdp_param_group.fsdp_params]
            assert sum(math.prod(fp.padded_sharded_param_size) for fp in managed) == sum(
                p.padded_shard for p in shards.values() if p.trainable)
            whole = [(n, p) for n, p in real.items()
                     if p.requires_grad and tuple(p.placements)[-1:] == (Replicate(),)]
    found = adapters(inputs)
    assert len(whole) == len(found)
    assert sorted(math.prod(p.shape) for _, p in whole) == sorted(
        math.prod(x.replicated_factor.shape) for x in found)
    rows = [c for c in collectives(inputs) if c.where.startswith("LoRA replicated")]
    assert rows[0].calls == len(found)
    assert rows[0].tensor_bytes * rows[0].calls == 2 * sum(math.prod(p.shape) for _, p in whole)  # bf16


# ----------------------------------------------------------------------------------------- memory, by hand


def test_memory_parts_equal_hand_computed_numbers():
    """The debug Llama (h 64, MLP 192, 8 query / 4 KV heads of 8, vocabulary 512, 2 layers, untied) at tp 2 x dp 2,
    r 4, bf16-mixed, b 2 x s 32, SP, dropout 0.1: every LoRA memory part, computed by hand."""
    config = get_config("debug")
    inputs = _inputs(config, tp=2, dp=2, lora=Lora(rank=4, dropout=0.1))
    mem = analyze(inputs, top=0).memory
    # Frozen base, TP rank 0, bf16, not split over dp: embed_tokens and lm_head 256 x 64 rows each, final norm 64;
    # per layer 2 norms of 64, q 32x64, k and v 16x64, o 64x32, gate and up 96x64, down 64x96.
    per_layer = 2 * 64 + 32 * 64 + 2 * 16 * 64 + 64 * 32 + 2 * 96 * 64 + 64 * 96
    assert mem[FROZEN_BASE] == 2 * (2 * 256 * 64 + 64 + 2 * per_layer) == 164_480
    # Adapters, FSDP2 rows ceil(rows / 2): q A (4,64) -> 2x64, B (32,4) -> 16x4; k, v A 2x64, B (16,4) -> 8x4;
    # o A (4,32) -> 2x32, B (64,4) -> 32x4; gate, up A 2x64, B (96,4) -> 48x4; down A (4,96) -> 2x96, B 32x4.
    adapter = (128 + 64) + 2 * (128 + 32) + (64 + 128) + 2 * (128 + 192) + (192 + 128)
    assert adapter == 1664
    assert mem["adapter parameters"] == 4 * 2 * adapter  # fp32 master shards, 2 layers
    assert mem["adapter gradients"] == 4 * 2 * adapter
    assert mem["adapter optimizer (AdamW)"] == 8 * 2 * adapter
    # Per layer (E = 64 tokens, a = 2): the r-wide lora_A outputs of 7 projections; with dropout, each projection's
    # 1-byte mask (inputs 64 for q, k, v, gate, up; 32 for o_proj, 96 for down_proj); the two gathered norm outputs
    # and the MLP product, once each, for the adapters' lora_A (frozen matmuls keep only their weight).
    layer = layer_activation_bytes(inputs)
    assert layer["LoRA: lora_A outputs (r wide)"] == 7 * 2 * 64 * 4
    assert layer["LoRA: dropout masks"] == 1 * 64 * (5 * 64 + 32 + 96)
    assert layer["gathered norm outputs kept for lora_A (whole)"] == 2 * 2 * 64 * 64
    assert layer["MLP product kept for down_proj's lora_A"] == 2 * 64 * 96
    assert layer["MLP (gate, up, silu)"] == 3 * 2 * 64 * 96
    assert layer["q, k, v"] == 2 * 64 * (32 + 2 * 16)
    # Outside the layers: the frozen embedding and lm_head keep nothing; layer 0's first norm (input 2x32x64/2
    # bf16 + fp32 rsqrt per local token) neither.
    assert "embedding, final norm, lm_head input" not in mem
    assert mem["layer 0 (its input needs no gradient)"] == -(2 * 64 * 64 // 2 + 4 * 64 // 2)


# ----------------------------------------------------------------------------------------- activations, measured


def _storage(t):
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()


def _lora_layer(config, tp, sp, targets, dropout):
    """A bf16 PEFT-wrapped decoder layer of the native Llama, TP-sharded (under the fake process group the caller
    opened) as the strategy shards it, with its RoPE tables."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    torch.manual_seed(0)
    model = _peft_model(Llama(config), 4, targets, dropout).to(torch.bfloat16)
    if tp > 1:
        plan = resolve_plan(model, "auto", sequence_parallel=sp, loss_parallel=True)
        apply_tensor_parallel(model, plan, init_device_mesh("cpu", (tp,)))
    else:  # as the strategy does at tp 1
        keep_dropout_masks(model)
    inner = model.base_model.model
    freqs = torch.outer(torch.arange(32).float(), inner.model.inv_freq)
    emb = torch.cat((freqs, freqs), -1)
    return model, inner.model.layers[0], (emb.cos().bfloat16(), emb.sin().bfloat16())


@pytest.mark.parametrize("tp,sp,heads,dropout,targets", [
    (1, True, "even", 0.0, TARGETS), (2, True, "even", 0.0, TARGETS), (2, False, "even", 0.1, TARGETS),
    (2, True, "9:3", 0.0, TARGETS), (2, True, "9:3", 0.1, TARGETS),
    (2, True, "even", 0.1, ("q_proj", "v_proj", "down_proj")), (2, True, "even", 0.0, ("v_proj", "up_proj"))])
def test_lora_activation_formula_equals_saved_tensors(tp, sp, heads, dropout, targets, monkeypatch):
    """Bytes autograd saves in one real bf16 PEFT decoder layer (TP-sharded under a fake process group) equal the
    formula: the frozen projections keep only their weights, so a projection's input stays only where lora_A keeps
    it; with dropout each adapter keeps a 1-byte mask (not a dropped copy: lightning_tp/parallel/lora.py); r-wide
    lora_A outputs; for heads tp does not divide (9:3), the selected rows of the adapter factors that follow the
    replicated projections."""
    config = get_config("debug").replace(num_hidden_layers=1, **_HEADS[heads])
    b, s = 2, 32
    with fake_world(0, tp):
        model, layer, rope = _lora_layer(config, tp, sp, targets, dropout)
        x = torch.randn(b, s, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        layer(x, position_embeddings=rope)  # a replicated o_proj makes its head index in its first forward
        skip = {_storage(p).data_ptr() for p in model.parameters()} | {_storage(t).data_ptr() for t in rope}
        # the head indices of replicated projections are part of the module (made once), not activations
        skip |= {getattr(m, n).untyped_storage().data_ptr() for m in model.modules()
                 for n in ("head_index", "_head_index") if isinstance(getattr(m, n, None), torch.Tensor)}
        saved = {}

        def pack(t):
            st = _storage(t)
            if st.data_ptr() not in skip:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, position_embeddings=rope)
    inputs = _inputs(config, tp=tp, seq_len=s, batch_size=b, sequence_parallel=sp,
                     lora=Lora(rank=4, dropout=dropout, target_modules=targets))
    assert sum(saved.values()) == sum(layer_activation_bytes(inputs).values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_whole_model_difference_equals_the_formula(dropout, monkeypatch):
    """A whole bf16 model (2 layers, embedding to loss) with PEFT's adapters saves, against the same model trained in
    full, what the formula says it should: per layer as above, and outside the layers no token ids (frozen
    embedding), no lm_head input (frozen lm_head), and nothing for layer 0's first norm (its input needs no
    gradient)."""
    import torch.nn.functional as F

    from lightning_tp.planner.memory import activations
    config = get_config("debug")
    b, s = 2, 32
    ids = torch.randint(0, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)  # a tensor of its own, kept by the loss either way

    def saved_bytes(lora: bool) -> int:
        torch.manual_seed(0)
        model = Llama(config)
        if lora:
            model = _peft_model(model, 4, TARGETS, dropout)
            keep_dropout_masks(model)  # as the strategy does at tp 1
        model = model.to(torch.bfloat16)
        skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), labels]}
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(ids)
            F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return sum(saved.values())

    def formula(lora) -> int:
        parts = activations(_inputs(config, seq_len=s, batch_size=b, lora=lora))
        return sum(v for k, v in parts.items() if not k.startswith("transient"))

    lora = Lora(rank=4, dropout=dropout)
    assert saved_bytes(True) - saved_bytes(False) == formula(lora) - formula(None)


@pytest.mark.parametrize("tp,lora", [(1, True), (2, True), (2, False)])
def test_selective_formula_equals_what_the_policy_keeps(tp, lora):
    """Under ``selective``, the tensors the strategy's op policy keeps (recorded from its own MUST_SAVE decisions in
    a real bf16 layer, TP + SP under a fake process group) plus the block input equal the formula. With LoRA the
    policy also keeps the r-wide lora_A outputs, every lora_B output and, at tp > 1, the row-parallel base's local
    partial sum (the LoRA forward multiplies local tensors, which the policy cannot tell from a whole matmul)."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from lightning_tp.parallel.recompute import selective_policy

    config = get_config("debug").replace(num_hidden_layers=1)
    kept = []
    base = selective_policy()

    def policy(ctx, op, *args, **kwargs):
        decision = base(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            out = op(*args, **kwargs)
            kept.extend(_storage(o).nbytes() for o in (out if isinstance(out, (tuple, list)) else (out,))
                        if isinstance(o, torch.Tensor))
        return decision

    with fake_world(0, tp):
        if lora:
            _, layer, rope = _lora_layer(config, tp, True, TARGETS, 0.0)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            from lightning_tp.parallel.parallelize import apply_tensor_parallel
            from lightning_tp.parallel.plans import resolve_plan

            model = Llama(config).to(torch.bfloat16)
            if tp > 1:
                plan = resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=True)
                apply_tensor_parallel(model, plan, init_device_mesh("cpu", (tp,)))
            layer = model.model.layers[0]
            freqs = torch.outer(torch.arange(32).float(), model.model.inv_freq)
            emb = torch.cat((freqs, freqs), -1)
            rope = (emb.cos().bfloat16(), emb.sin().bfloat16())
        x = torch.randn(2, 32, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        checkpoint(layer, x, use_reentrant=False, position_embeddings=rope,
                   context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
    inputs = _inputs(config, tp=tp, sequence_parallel=True, activation_checkpointing="selective",
                     lora=Lora(rank=4, dropout=0.0) if lora else None)
    formula = layer_activation_bytes(inputs)
    assert sum(kept) + formula["block input"] == sum(formula.values())


# ----------------------------------------------------------------------------------------- compute, communication


def test_frozen_base_drops_the_weight_gradient_matmuls_and_fsdp_traffic():
    """The frozen matmuls run forward and input gradient only (4 of 6 FLOPs per weight per token); FSDP2 gathers and
    reduces the adapters alone (one unit per block, none for the frozen embeddings and lm_head); the TP collectives
    per layer are those without LoRA, plus one all-reduce per adapted projection per step (not per micro-batch)."""
    config = get_config("llama3_8b")
    full = _inputs(config, tp=4, dp=4, seq_len=1024, accumulate=3)
    lora = full.replace(lora=Lora(rank=16))
    assert rank_flops(lora)[0] / rank_flops(full)[0] == pytest.approx(2 / 3)
    found = adapters(lora)
    assert adapter_flops(lora) == 6 * 16 * sum(x.in_local + x.out_local for x in found)
    non_embedding = config.num_params - config.vocab_size * config.hidden_size
    trainable = sum(math.prod(x.a.shape) + math.prod(x.b.shape) for x in found)
    assert model_flops_per_token(lora) == (config.flops_per_token(1024) - 2 * non_embedding + 6 * trainable)
    base_rows = [c for c in collectives(full) if c.group == "tp"]
    lora_rows = [c for c in collectives(lora) if c.group == "tp"]
    assert lora_rows[:len(base_rows)] == base_rows
    (extra,) = lora_rows[len(base_rows):]
    assert extra.kind == "all_reduce" and extra.calls == 32 * 7  # once per step although 3 micro-batches
    # accumulated over micro-batches: the reduce dtype (fp32) of each replicated factor, A (16 x 4096) of q/k/v,
    # gate/up, B (4096 x 16) of o_proj and down_proj
    assert extra.tensor_bytes * extra.calls == 4 * 32 * 7 * 16 * 4096
    dp_rows = {c.where: c for c in collectives(lora) if c.group == "dp"}
    forward = dp_rows["parameters, forward (every micro-batch)"]
    assert forward.calls == 3 * config.num_hidden_layers
    padded = sum(p.padded_shard for p in param_shards(lora) if p.trainable)
    assert forward.tensor_bytes * forward.calls == 3 * 2 * padded * 4  # bf16 whole (tp-local) units, 3 micro-batches


# ----------------------------------------------------------------------------------------- the 70B verdict


def test_llama3_70b_lora_at_tp8_on_one_node_gets_a_memory_figure_and_a_verdict():
    """``lightning-tp plan model=llama3_70b strategy.tensor_parallel_size=8 strategy.data_parallel_size=1 peft=lora
    peft.rank=16 accelerator=h100``: the frozen base is 1/8 of the bf16 model per rank (norms whole); at seq 8192
    without checkpointing it does not fit, because PEFT's dropout keeps a dropped copy of each adapter's input (5 of
    them whole per layer); full checkpointing or peft.dropout=0 fit on the same node."""
    argv = ["model=llama3_70b", "strategy.tensor_parallel_size=8", "strategy.data_parallel_size=1", "peft=lora",
            "peft.rank=16", "accelerator=h100"]
    inputs, _ = compose_inputs(argv)
    report = analyze(inputs)
    cfg = inputs.config
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    assert report.memory[FROZEN_BASE] == 2 * ((cfg.num_params - norms) // 8 + norms)
    h, r, t = cfg.hidden_size, 16, 8
    q, kv, inter = cfg.num_attention_heads * cfg.resolved_head_dim, cfg.num_key_value_heads * cfg.resolved_head_dim, \
        cfg.intermediate_size
    # per layer and rank, dp 1: A whole and B split for q/k/v/gate/up, A split and B whole for o/down
    per_layer = r * (5 * h + (q + 2 * kv + 2 * inter) // t + (q + inter) // t + 2 * h)
    assert report.memory["adapter parameters"] == 4 * cfg.num_hidden_layers * per_layer
    total = sum(report.memory.values())
    assert report.ranks[0]["memory_total"] == total and not report.ranks[0]["fits"]
    assert report.verdict.startswith(
        "LoRA (r=16, 7 projections per layer, dropout 0.05) on llama3_70b at tp 8 x dp 1 on one node of 8 x h100,"
        f" activation checkpointing none: {total / 2**30:,.1f} GiB per rank of 71.1 GiB usable: does not fit. At tp 8"
        " x dp 1 it fits with activation checkpointing full (")
    assert "or with peft.dropout=0" in report.verdict
    for change in (["strategy.activation_checkpointing=full"], ["peft.dropout=0"]):
        fitted = analyze(compose_inputs(argv + change)[0], top=0)
        assert fitted.ranks[0]["fits"] and ": fits, " in fitted.verdict
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv + ["top=0"])
    text = out.getvalue()
    assert "LoRA: 7 adapted projections per layer" in text and "207,093,760 trainable parameters" in text
    assert text.rstrip().splitlines()[-1] == f"Verdict: {analyze(inputs, top=0).verdict}"


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides,match", [
    (["peft.target_modules=[qkv]"], r"peft.target_modules=\['qkv'\] matches no module.*q_proj"),
    (["peft.target_modules=[lm_head]"], r"adapts 'lm_head'.*outside the decoder layers"),
    (["peft.target_modules=[mlp]"], r"adapts 'model.layers.0.mlp' \(LlamaMLP\).*nn.Linear"),
    (["peft.rank=0"], r"peft.rank=0 must be a positive int"),
    (["peft.rank=40"], r"peft.rank=40 is larger than the smaller side of model.layers.0.self_attn.k_proj"
                       r" \(32 x 64\).*peft.rank <= 32"),
    (["peft.dropout=1.0"], r"peft.dropout=1.0 must be in \[0, 1\)"),
    (["peft.method=dora"], r"peft.method='dora'.*peft=none or peft=lora"),
])
def test_bad_lora_inputs_raise_planner_errors_naming_the_key(overrides, match):
    with pytest.raises(PlannerError, match=match):
        inputs, _ = compose_inputs(["model=debug", "strategy.tensor_parallel_size=2", "strategy.data_parallel_size=1",
                                    "data.seq_len=64", "peft=lora", *overrides])
        analyze(inputs, top=0)


def test_without_peft_nothing_changes():
    """``peft=none`` (the default) plans every weight trained: no frozen part, no LoRA section."""
    inputs, cfg = compose_inputs(["model=debug", "strategy.tensor_parallel_size=2", "strategy.data_parallel_size=2",
                                  "data.seq_len=64"])
    assert cfg.peft.method == "none" and inputs.lora is None
    report = analyze(inputs, top=0)
    assert report.lora == {} and "parameters" in report.memory and FROZEN_BASE not in report.memory
    assert all(p.trainable for p in planner_layout.param_shards(inputs))
    assert report.verdict.startswith("Training every weight of debug at tp 2 x dp 2 on 4 of one node's 8 h100")
