"""What a recipe run prints and draws at the end: rounded numbers, the loss-curve PNG, the sample keys."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from lightning_tp.recipes import report
from lightning_tp.recipes.config import RecipeConfigError, compose_recipe


@pytest.mark.parametrize("seconds, text", [(4.24, "4.2 s"), (38.4, "38 s"), (59.6, "1 min 0 s"), (229.3, "3 min 49 s"),
                                           (3599.4, "59 min 59 s"), (3900, "1 h 05 min"), (float("nan"), "?")])
def test_format_duration(seconds: float, text: str) -> None:
    assert report.format_duration(seconds) == text


def test_format_count_and_loss() -> None:
    assert report.format_count(1600.095458984375) == "1,600"
    assert report.format_count(2234.6) == "2,235"
    assert report.format_count(1234567.8) == "1,234,568"
    assert report.format_count(2.54) == "2.5"
    assert report.format_count(None) == "?"
    assert report.format_loss(6.378069877624512) == "6.38"
    assert report.format_loss(2.0419) == "2.04"
    assert report.format_loss(None) == "?"


SUMMARY = {"wall_time_s": 229.31234, "steps": 200, "world_size": 4, "tokens_per_sec": 1600.095458984375,
           "val_loss_history": [[0, 6.378069877624512], [100, 3.1], [200, 2.0419]],
           "checkpoint": "out/pretrain/last", "sample_prompt": "def ", "sample": "main():",
           "sample_temperature": 0.8, "sample_top_k": 40, "sample_seed": 0}


def test_summary_lines_are_rounded_for_people() -> None:
    lines = report.summary_lines(SUMMARY, sizes=(2, 2), loss_curve="out/pretrain/loss_curve.png",
                                 out_dir="out/pretrain")
    assert lines[0] == ("[lightning-tp] 200 steps in 3 min 49 s on 4 processes (dp=2 x tp=2); val loss 6.38 -> 2.04"
                        " (-68%); 1,600 tokens/s")
    assert lines[1] == "[lightning-tp] sample (temperature 0.8, top-k 40, seed 0): 'def ' -> 'main():'"
    assert lines[2] == ("[lightning-tp] wrote out/pretrain/summary.json, out/pretrain/loss_curve.png; checkpoint"
                        " out/pretrain/last")
    greedy = report.summary_lines({**SUMMARY, "sample_temperature": 0.0})
    assert len(greedy) == 2 and "sample (greedy)" in greedy[1]
    bare = report.summary_lines({"steps": 0, "world_size": 1, "wall_time_s": 1.0, "sample": None})
    assert bare == ["[lightning-tp] 0 steps in 1.0 s on 1 process"]


def test_read_train_losses_from_a_csv_log(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/loss\n0,0,6.28,\n0,1,6.26,\n0,1,,6.2\n0,2,6.1,\n")
    assert report.read_train_losses(csv) == [(0, 6.28), (1, 6.26), (2, 6.1)]
    assert report.read_train_losses(tmp_path / "missing.csv") == []
    assert report.read_train_losses(None) == []


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_loss_curve_writes_a_png(tmp_path: Path) -> None:
    assert report.has_matplotlib()  # in the test extra; without it the recipes print one line and skip the PNG
    path = report.write_loss_curve(tmp_path / "sub" / "loss_curve.png", [(0, 6.3), (1, 6.1), (2, 5.0)],
                                   [(0, 6.3), (2, 5.2)], title="3 steps")
    assert path == tmp_path / "sub" / "loss_curve.png"
    width, height = _png_size(path)
    assert (width, height) == (640, 400) and path.stat().st_size > 5000
    assert report.write_loss_curve(tmp_path / "empty.png", [], []) is None and not (tmp_path / "empty.png").exists()


def test_write_loss_curve_without_matplotlib_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "has_matplotlib", lambda: False)
    assert report.write_loss_curve(tmp_path / "c.png", [(0, 1.0)], [(0, 1.0)]) is None
    assert not (tmp_path / "c.png").exists()


def test_sample_keys_in_the_schema() -> None:
    cfg = compose_recipe("pretrain")
    assert (cfg.sample_temperature, cfg.sample_top_k, cfg.sample_seed) == (0.8, 40, None)
    cfg = compose_recipe("finetune", ["sample_temperature=0", "sample_top_k=null", "sample_seed=3"])
    assert (cfg.sample_temperature, cfg.sample_top_k, cfg.sample_seed) == (0.0, None, 3)
    with pytest.raises(RecipeConfigError, match="sample_top_k"):
        compose_recipe("pretrain", ["sample_top_k=many"])
    with pytest.raises(RecipeConfigError, match="sample_temperature"):
        compose_recipe("pretrain", ["sample_temprature=0.5"])  # misspelled: close match named


def test_bad_sample_values_fail_before_anything_starts() -> None:
    from lightning_tp.recipes.run import _sample_settings

    assert _sample_settings(compose_recipe("pretrain", ["seed=5"])) == {"temperature": 0.8, "top_k": 40, "seed": 5}
    assert _sample_settings(compose_recipe("pretrain", ["sample_seed=9"]))["seed"] == 9
    with pytest.raises(ValueError, match="sample_temperature=0 for greedy"):
        _sample_settings(compose_recipe("pretrain", ["sample_temperature=-1"]))
    with pytest.raises(ValueError, match="top_k"):
        _sample_settings(compose_recipe("pretrain", ["sample_top_k=0"]))
