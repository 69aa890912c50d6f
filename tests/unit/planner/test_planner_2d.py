"""The planner's 2D tensor parallelism (lightning_tp/planner/grid.py, crossover.py; docs/2d.md): per-layer
elements against the closed form, the 1D limit c = 1, the activation terms, the alpha-beta time and its
crossover, the recommendation, and the refusals."""

from __future__ import annotations

from fractions import Fraction

import pytest

from lightning_tp import hardware
from lightning_tp.models import get_config
from lightning_tp.planner import (
    PlanInputs,
    PlannerError,
    choose_grid,
    collectives,
    compare_2d,
    compare_grid,
    compose_inputs,
    grid_problems,
    layer_activation_bytes,
    layer_terms,
    recommend,
)
from lightning_tp.planner.crossover import bytes_ratio, step_crossover_tokens, tp_step_seconds
from lightning_tp.planner.grid import grids

NVLINK, IB = hardware.get_link("nvlink4"), hardware.get_link("ib_ndr")


def _inputs(config, tp=8, dp=1, seq_len=64, batch_size=2, **kwargs):
    return PlanInputs(config=config, tp=tp, dp=dp, seq_len=seq_len, batch_size=batch_size,
                      accelerator=hardware.get_accelerator("h100"), intra_link=NVLINK, inter_link=IB, **kwargs)


def _small(**changes):
    """The debug preset with 8 KV heads, so every grid of 8 divides it."""
    return get_config("debug", num_key_value_heads=8, **changes)


def _large(terms, r, c):
    """Elements sent, norm terms (statistics, weight gradients) left out."""
    return sum(x.sent(r, c) for x in terms if not x.name.startswith("norm"))


@pytest.mark.parametrize("tokens, h, F, k, r, c", [
    (8192, 4096, 14336, 1024, 4, 2), (8192, 4096, 14336, 1024, 2, 4), (1000, 2048, 8192, 512, 2, 2),
    (4096, 8192, 28672, 1024, 8, 2), (333, 64, 192, 32, 3, 5)])
def test_layer_elements_equal_the_closed_form(tokens, h, F, k, r, c):
    terms = layer_terms(tokens, h, h, k, F, r, c)
    t = r * c
    expected = Fraction(2 * tokens, t) * (4 * h * (r - 1) + (c - 1) * (2 * h + 2 * k + 3 * F))
    assert _large(terms, r, c) == pytest.approx(float(expected), rel=1e-12)
    # forward, term by term, as docs/2d.md lists them
    fwd = {x.name: x.sent(r, c) for x in terms if x.name.endswith("(fwd)")}
    assert fwd["block inputs (attention, MLP) (fwd)"] == pytest.approx(2 * tokens * h / c * (r - 1) / r)
    assert fwd["block outputs (o_proj, down) (fwd)"] == pytest.approx(2 * tokens * h / c * (r - 1) / r)
    assert fwd["q output (fwd)"] + fwd["k, v outputs (fwd)"] == pytest.approx(tokens * (h + 2 * k) / r * (c - 1) / c)
    assert fwd["attention output (o_proj input) (fwd)"] == pytest.approx(tokens * h / r * (c - 1) / c)
    assert fwd["gate, up outputs (fwd)"] == pytest.approx(2 * tokens * F / r * (c - 1) / c)
    assert fwd["activation product (down input) (fwd)"] == pytest.approx(tokens * F / r * (c - 1) / c)
    assert fwd["norm statistics (fwd)"] == pytest.approx(2 * 2 * tokens / r * (c - 1) / c)
    calls = {phase: sum(x.calls for x in terms if x.name.endswith(phase) and not x.name.startswith("norm"))
             for phase in ("(fwd)", "(bwd)")}
    assert calls == {"(fwd)": 11, "(bwd)": 11}
    # the ratio to 1D's 8·T·h·(t−1)/t is the brief's, independent of the tokens
    ratio = expected / (8 * tokens * h * Fraction(t - 1, t))
    assert bytes_ratio(h, k, F, r, c) == pytest.approx(float(ratio), rel=1e-12)


def test_planner_rows_are_the_layer_terms_times_layers_and_micro_batches():
    config, (r, c), m = _small(), (4, 2), 3
    inputs = _inputs(config, grid=(r, c), accumulate=m)
    rows = [x for x in collectives(inputs) if x.where.startswith("decoder layers 2D")]
    e, h, F = inputs.tokens, config.hidden_size, config.intermediate_size
    k = config.num_key_value_heads * config.resolved_head_dim
    large = sum(x.bytes_per_rank for x in rows if "norm" not in x.where)
    expected = 2 * 2 * e / (r * c) * (4 * h * (r - 1) + (c - 1) * (2 * h + 2 * k + 3 * F))  # bf16
    assert large == pytest.approx(config.num_hidden_layers * m * expected)
    assert sum(x.calls for x in rows if "norm" not in x.where) == config.num_hidden_layers * m * 22
    # alpha-beta on NVLink: bytes / (bandwidth · efficiency) + calls · latency
    assert sum(x.seconds for x in rows) == pytest.approx(
        sum(x.bytes_per_rank for x in rows) / (NVLINK.bandwidth * NVLINK.efficiency)
        + sum(x.calls for x in rows) * NVLINK.latency)


@pytest.mark.parametrize("mode", ["none", "full"])
def test_a_one_column_grid_is_the_1d_layer(mode):
    config, t = _small(), 8
    one_d = _inputs(config, tp=t, activation_checkpointing=mode)
    grid = one_d.replace(grid=(t, 1))
    rows_1d = [x for x in collectives(one_d) if x.where.startswith("decoder layers")]
    rows_2d = [x for x in collectives(grid) if x.where.startswith("decoder layers")]
    for field in ("bytes_per_rank", "calls", "seconds"):
        assert sum(getattr(x, field) for x in rows_2d) == pytest.approx(sum(getattr(x, field) for x in rows_1d))
    assert sum(layer_activation_bytes(grid).values()) == pytest.approx(sum(layer_activation_bytes(one_d).values()))


def test_2d_activations_follow_the_grid_shapes():
    config, (r, c) = _small(), (2, 4)
    inputs = _inputs(config, grid=(r, c))
    b, s, h, F, a = inputs.batch_size, inputs.seq_len, config.hidden_size, config.intermediate_size, 2
    d, nh, nkv = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
    numel = lambda *shape: a * __import__("math").prod(shape)  # noqa: E731
    expected = (2 * (numel(b, s // r, h // c) + 4 * b * s // r)  # norm inputs (residual) + fp32 rsqrt
                + 2 * numel(b, s, h // c)  # gathered norm outputs
                + numel(b, s, nh * d // (r * c)) + 2 * numel(b, s, nkv * d // (r * c))  # q, k, v
                + numel(b, s, nh * d // (r * c)) + 4 * b * nh // (r * c) * s  # attention output, lse
                + 4 * numel(b, s, F // (r * c))  # gate, up, silu, product
                + numel(b, s, nh * d // r) + numel(b, s, F // r))  # o_proj, down inputs gathered over C
    assert sum(layer_activation_bytes(inputs).values()) == pytest.approx(expected)
    assert sum(layer_activation_bytes(inputs, "full").values()) == numel(b, s // r, h // c)


def test_time_crossover_and_the_recommendation_flip_only_across_it():
    config = _small()
    base = _inputs(config, seq_len=64, batch_size=1)
    row = compare_grid(base, (4, 2))
    assert row.bytes_ratio < 1 and row.calls_2d > row.calls_1d and row.crossover_tokens > 0
    # per layer: time is A + B·T on NVLink; at the crossover 1D and 2D take the same time
    at = compare_grid(base.replace(batch_size=round(row.crossover_tokens / 64)), (4, 2))
    assert at.time_2d_s == pytest.approx(at.time_1d_s, rel=1e-3)
    # per step (embedding and lm_head included): the recommendation's criterion
    cross = step_crossover_tokens(base, (4, 2))
    assert cross > 0
    below, above = int(cross * 0.8) // 64, int(cross * 1.25) // 64 + 1
    for batch, wins in ((below, False), (above, True)):
        inputs = base.replace(batch_size=batch)
        assert compare_grid(inputs, (4, 2)).wins_bytes  # bytes favour 2D at any token count
        assert (tp_step_seconds(inputs, (4, 2)) < tp_step_seconds(inputs, None)) is wins
        assert (choose_grid(inputs)[0] == (4, 2)) is wins
        tp8 = [x for x in recommend(inputs, top=100) if x.tp == 8]
        assert (tp8[0].grid == (4, 2)) is wins
        assert all(x.grid in (None, (4, 2)) for x in tp8)  # (2, 4) moves more bytes: never taken
    # where bytes favour 1D (2x2, 2x4 on one node) 2D never wins in time
    for grid in ((2, 2), (2, 4)):
        assert compare_grid(base.replace(batch_size=above), grid).crossover_tokens is None
    reason = choose_grid(base.replace(batch_size=below))[1]
    assert reason.startswith("1D at tp 8") and "2D wins only above" in reason


def test_compare_2d_spans_tp_models_and_marks_refused_grids():
    inputs = _inputs(get_config("llama3_8b"), seq_len=8192, batch_size=1, model_name="llama3_8b")
    rows = compare_2d(inputs)
    assert {x.tp for x in rows} == {4, 8, 16}
    assert {x.hidden for x in rows} == {2048, 4096, 8192}
    assert len(rows) == 3 * sum(len(grids(t)) for t in (4, 8, 16))
    for x in rows:
        assert (x.tp == 16) is bool(x.refused) and ("num_key_value_heads=8" in x.refused or x.tp < 16)
        assert x.sent_2d / x.sent_1d == pytest.approx(x.bytes_ratio, rel=2e-3)  # norm terms are tiny
        # tp 16 spans two nodes: 1D's ring and 2D's R group run over InfiniBand, 2D's C group over NVLink
        assert x.links == ("R ib_ndr, C nvlink4" if x.tp == 16 else "R nvlink4, C nvlink4")


def test_grid_spelling_and_refusals_are_typed_errors_with_the_fix():
    inputs, _ = compose_inputs(["model=llama3_8b", "strategy.tensor_parallel_size=[4,2]",
                                "strategy.data_parallel_size=1"])
    assert (inputs.tp, inputs.grid) == (8, (4, 2))
    refused = [  # the strategy's own rule (lightning_tp.config.grid_problems), then the planner's shape rules
        (["strategy.sequence_parallel=false"], r"does not combine with sequence_parallel=False \(fix: drop"),
        (["strategy.compile=true"], r"does not combine with compile=True"),
        (["strategy.float8=true"], r"does not combine with float8=True"),
        (["strategy.activation_checkpointing=selective"], r"combine with activation_checkpointing='selective'"),
        (["strategy.save_sharded_inputs=true"], r"does not combine with save_sharded_inputs=True"),
        (["peft=lora"], r"LoRA/PEFT.*use peft=none"),
        (["model.num_key_value_heads=4"], r"num_key_value_heads=4 is not divisible by 8; no grid of 8"),
    ]
    for extra, message in refused:
        with pytest.raises(PlannerError, match=r"tensor_parallel_size=\[4,2\].*" + message):
            compose_inputs(["model=llama3_8b", "strategy.tensor_parallel_size=[4,2]",
                            "strategy.data_parallel_size=1", *extra])
    for bad in ("[4,2,1]", "[0,2]"):
        with pytest.raises(PlannerError, match=r"tensor_parallel_size.*must be two positive ints \(rows, columns\)"):
            compose_inputs(["model=llama3_8b", f"strategy.tensor_parallel_size={bad}"])
    with pytest.raises(PlannerError, match=r"r\*c=4 is not the TP size 8; give a grid whose product is 8"):
        _inputs(_small(), grid=(2, 2))
    problems = grid_problems((2, 4), 8, hidden=4096, intermediate=14336, heads=32, kv_heads=8, seq_len=8192,
                             family="gemma2")
    assert problems == ["strategy.tensor_parallel_size=[2,4]: model_type 'gemma2' is not one the 2D layout"
                        " shards (llama, mistral, qwen2); use a 1D tensor_parallel_size=8"]
    hidden = grid_problems((1, 8), 8, hidden=4100, intermediate=14336, heads=32, kv_heads=8)
    assert len(hidden) == 1 and "hidden_size=4100 is not divisible by 8" in hidden[0] and "[2,4]" in hidden[0]
