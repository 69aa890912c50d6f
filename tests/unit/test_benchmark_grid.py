"""The accounting of ``python -m benchmarks grid`` (2D against 1D), without launching ranks: the per-term
formula against docs/2d.md's closed forms and Megatron's 1D figure, the 2-layer − 1-layer difference of
recorded collectives, the term-by-term comparison, the grids and shapes of the points; and the benchmark's own
measurement of its quick point on a fake process group (rank 0 of 4 and of 8: real shapes, no-op collectives),
every term equal to the formula. The real launch (about 70 s for its quick mode on the shared 2-core machine)
is run by hand: ``python -m benchmarks grid``.
"""

from __future__ import annotations

import sys

import pytest
from launching import fake_world
from paths import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import grid  # noqa: E402
from benchmarks.comm import megatron_elements  # noqa: E402

AG, RS, AR = "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"


def _large(terms: dict) -> float:
    return grid.large_elements({p: {f"{op} {d}": list(v) for (op, d), v in e.items()} for p, e in terms.items()})


@pytest.mark.parametrize("r, c", [(2, 2), (2, 4), (4, 2), (8, 2), (4, 4)])
@pytest.mark.parametrize("tokens, h, k, f", [(256, 256, 256, 704), (1024, 512, 256, 1344), (4096, 4096, 1024, 14336)])
def test_per_term_formula_sums_to_the_closed_form(r: int, c: int, tokens: int, h: int, k: int, f: int) -> None:
    terms = grid.expected_terms(tokens, h, h, k, f, r, c)
    t = r * c
    closed = 2 * tokens / t * (4 * h * (r - 1) + (c - 1) * (2 * h + 2 * k + 3 * f))
    assert _large(terms) == pytest.approx(closed)
    one_d = grid.expected_terms(tokens, h, h, k, f, t, 0)
    assert _large(one_d) == pytest.approx(megatron_elements(1, tokens, h, t))
    assert _large(terms) / _large(one_d) == pytest.approx(grid.brief_ratio(h, k, f, r, c))
    # calls: 11 forward (2 AG_R, 5 RS_C, 2 AG_C, 2 RS_R) + 2 norm all-reduces; 1D SP: 4
    assert sum(n for (op, _), (n, _) in terms["forward"].items() if op != AR) == 11
    assert sum(n for n, _ in terms["forward"].values()) == sum(n for n, _ in terms["backward"].values()) == 13
    assert sum(n for n, _ in one_d["forward"].values()) == 4


def test_ratio_at_llama3_8b_shapes() -> None:
    # 2h + 2k + 3F = 13h at h 4096, k 1024, F 14336: the ratio is [4(r−1) + 13(c−1)] / [4(rc−1)]
    for r, c in [(2, 2), (4, 2), (2, 4), (4, 4), (8, 2)]:
        assert grid.brief_ratio(4096, 1024, 14336, r, c) == pytest.approx((4 * (r - 1) + 13 * (c - 1))
                                                                          / (4 * (r * c - 1)))
    assert grid.brief_ratio(4096, 1024, 14336, 4, 2) < 1 < grid.brief_ratio(4096, 1024, 14336, 2, 4)


def test_terms_over_a_group_of_one_are_left_out() -> None:
    rows_only = grid.expected_terms(64, 32, 32, 32, 96, 4, 1)
    assert {d for phase in rows_only.values() for _, d in phase} == {"R"}
    cols_only = grid.expected_terms(64, 32, 32, 32, 96, 1, 4)
    assert {d for phase in cols_only.values() for _, d in phase} == {"C"} and not cols_only["grads"]


def test_per_layer_is_two_layers_minus_one_in_the_ring_convention() -> None:
    shared = [(AR, 512, 4, "flat"), (AG, 100, 2, "R")]  # embedding, lm_head: in both models
    layer = [(AG, 100, 2, "R"), (RS, 300, 2, "C"), (AR, 16, 2, "C")]
    runs = {1: {p: list(shared) for p in grid.PHASES},
            2: {p: shared + layer for p in grid.PHASES}}
    got = grid.per_layer(runs)
    for phase in grid.PHASES:
        # all-gather input 100 (output 200) sends 100; reduce-scatter of 300 sends 150; all-reduce 2·16·1/2
        assert got[phase] == {f"{AG} R": [1, 100.0], f"{RS} C": [1, 150.0], f"{AR} C": [1, 16.0]}
    assert grid.large_elements(got) == 3 * 250.0 and grid.tiny_elements(got) == 3 * 16.0


def test_mismatches_name_the_phase_collective_and_dim() -> None:
    expected = grid.expected_terms(256, 256, 256, 256, 704, 2, 2)
    as_rows = {p: {f"{op} {d}": list(v) for (op, d), v in e.items()} for p, e in expected.items()}
    row = {"layout": "2D 2×2", "tokens": 256, "hidden": 256, "expected": as_rows,
           "per_layer": {p: {k: list(v) for k, v in e.items()} for p, e in as_rows.items()}}
    assert grid.mismatches(row) == []
    row["per_layer"]["backward"][f"{AR} flat"] = [1, 10.0]  # an unexpected collective
    row["per_layer"]["forward"][f"{AG} R"][1] += 1
    found = grid.mismatches(row)
    assert len(found) == 2
    assert any("backward all_reduce flat: measured 1 calls" in m for m in found)
    assert any("forward all_gather_into_tensor R" in m for m in found)


def test_grids_and_point_shapes() -> None:
    assert grid.grids_for(4) == [(2, 2)] and grid.grids_for(8) == [(2, 4), (4, 2)] and grid.grids_for(2) == []
    for _, _, h in grid.POINTS + grid.QUICK_POINTS:
        config = grid.model_config(h)
        for world in (4, 8):
            for r, c in grid.grids_for(world) + [(world, 1)]:
                assert config.num_attention_heads % (r * c) == 0
                assert config.num_key_value_heads % (r * c) == 0
                assert config.intermediate_size % (r * c) == 0 and h % c == 0
        assert abs(config.intermediate_size - 8 * h / 3) <= 32


def test_grid_command_refuses_a_world_without_a_grid() -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["grid", "--world", "2"])


@pytest.mark.parametrize("world", [4, 8])
def test_quick_point_on_a_fake_world_equals_the_formula(world: int) -> None:
    with fake_world(0, world):
        result = grid.measure_comm(quick=True)
    rows = result["rows"]
    assert [row["grid"] for row in rows] == [None, *grid.grids_for(world)]
    for row in rows:
        assert grid.mismatches(row) == [], row
        assert grid.tiny_elements(row["per_layer"]) > 0  # the norm all-reduces are seen (c10d and functional)
    one_d = rows[0]
    assert grid.large_elements(one_d["per_layer"]) == pytest.approx(
        megatron_elements(one_d["batch"], one_d["seq"], one_d["hidden"], world))
    for row in rows[1:]:
        measured = grid.large_elements(row["per_layer"]) / grid.large_elements(one_d["per_layer"])
        assert measured == pytest.approx(grid.brief_ratio(row["hidden"], row["kv_width"], row["intermediate"],
                                                          *row["grid"]))
    assert "equal to the formula: yes" in grid.report_comm(result)
