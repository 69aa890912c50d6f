"""``lightning-tp plan checkpoint=<hf dir or config.json>`` (lightning_tp/planner/checkpoint.py): the checkpoint's
transformers model on the meta device, the plan ``plan="auto"`` gives it (a named family's or a derived one), its real
parameter count, and a typed error for a model type transformers does not know."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from lightning_tp.parallel.families import FAMILIES
from lightning_tp.planner import PlannerError, analyze, compose_inputs

SHAPES = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZES = ["strategy.tensor_parallel_size=4", "strategy.data_parallel_size=2", "data.seq_len=1024", "top=2"]


def _write(tmp_path: Path, model_type: str, **extra) -> Path:
    directory = tmp_path / model_type
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**SHAPES, **extra, "model_type": model_type,
                                                       "architectures": ["AnythingForCausalLM"]}))
    return directory


def _plan(spec: Path, *more: str):
    inputs, _ = compose_inputs([f"checkpoint={spec}", *SIZES, *more])
    return inputs, analyze(inputs, top=2)


def test_llama_checkpoint_matches_the_preset_path(tmp_path: Path) -> None:
    """A Llama config.json maps through hf_config.model_config; memory and communication on transformers' Llama equal
    those of the native Llama of the same config (the preset path)."""
    inputs, report = _plan(_write(tmp_path, "llama"))
    assert (inputs.config.hidden_size, inputs.config.num_key_value_heads, inputs.config.vocab_size) == (512, 4, 4096)
    assert report.inputs["plan_source"] == "family 'llama'"
    assert report.inputs["num_params"] == inputs.config.num_params
    same = analyze(inputs.replace(checkpoint=None), top=2)
    assert report.memory == same.memory and report.communication == same.communication
    assert report.recommendation == same.recommendation
    assert {r["module"] for r in report.plan} == {r["module"] for r in same.plan}  # (module order differs)


def test_derived_family_checkpoint(tmp_path: Path) -> None:
    """Helium has no named family: the plan is derived from its base_model_tp_plan, and the report says so; the
    parameters are counted from the real model."""
    import transformers

    inputs, report = _plan(_write(tmp_path, "helium", head_dim=64))
    assert report.inputs["plan_source"].startswith("minimum-communication plan derived from base_model_tp_plan")
    config = transformers.AutoConfig.for_model("helium", **SHAPES, head_dim=64)
    expected = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert report.inputs["num_params"] == expected
    rows = {r["module"]: r for r in report.plan}
    assert rows["model.layers.0.self_attn.q_proj"]["tp_local"] == [128, 512]  # 8 heads x 64 over tp 4
    assert rows["model.layers.0.mlp.down_proj"]["tp_local"] == [512, 384]
    assert report.memory["parameters"] > 0 and report.recommendation


def test_derived_per_projection_and_partial_llama_fields(tmp_path: Path) -> None:
    """GLM (fused gate_up_proj): the per-projection plan, its extra collectives named in the report; a config file
    path works as well as its directory."""
    directory = _write(tmp_path, "glm", head_dim=64, partial_rotary_factor=0.5)
    _, report = _plan(directory / "config.json")
    assert "per-projection plan" in report.inputs["plan_source"]
    assert "mlp.gate_up_proj: 1 all-gather of its output (forward)" in report.inputs["plan_source"]


@pytest.mark.skipif("phi3" not in FAMILIES and "gemma" not in FAMILIES, reason="no Phi-3 or Gemma family registered")
def test_named_family_checkpoint(tmp_path: Path) -> None:
    model_type = "phi3" if "phi3" in FAMILIES else "gemma2"
    _, report = _plan(_write(tmp_path, model_type, head_dim=64))
    assert report.inputs["plan_source"].startswith("family ")
    assert report.memory["parameters"] > 0


def test_unknown_model_type_is_a_typed_error(tmp_path: Path) -> None:
    from lightning_tp.cli import main

    spec = _write(tmp_path, "not_a_model")
    with pytest.raises(PlannerError, match=r"model_type='not_a_model' is not a model type this transformers knows"):
        compose_inputs([f"checkpoint={spec}", *SIZES])
    with pytest.raises(SystemExit, match=r"PlannerError: checkpoint=") as failure:
        main(["plan", f"checkpoint={spec}", *SIZES])
    assert isinstance(failure.value.__cause__, PlannerError)
    with pytest.raises(PlannerError, match=r"does not exist"):
        compose_inputs([f"checkpoint={tmp_path / 'absent'}", *SIZES])
    (tmp_path / "plain.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PlannerError, match=r"has no model_type"):
        compose_inputs([f"checkpoint={tmp_path / 'plain.json'}", *SIZES])


def test_cli_reports_the_plan_source(tmp_path: Path) -> None:
    from lightning_tp.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["plan", f"checkpoint={_write(tmp_path, 'arcee')}", *SIZES])
    text = out.getvalue()
    assert "Plan source: minimum-communication plan derived from base_model_tp_plan" in text
    assert "model.layers.0.mlp.up_proj" in text and "Memory per rank" in text
