"""Hugging Face interop (:mod:`lightning_tp.checkpoint.hf`), single process, no network: config.json
both ways, safetensors checkpoints in (plain and DTensor parameters) and out, checkpoint errors, and
consolidation of sharded checkpoints."""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _ci_deps import require
from torch import nn

from lightning_tp.checkpoint.hf import (
    config_from_hf,
    config_to_hf,
    consolidated_state_dict,
    export_hf,
    llama_from_hf,
    load_hf_checkpoint,
    strip_prefix,
)
from lightning_tp.errors import CheckpointError
from lightning_tp.models import Llama, LlamaConfig, get_config
from lightning_tp.models.llama import RMSNorm

transformers = require("transformers")  # declared in the test extra: skips locally, fails under CI=true
require("safetensors")

# A short original context so that every branch of the Llama 3.1 RoPE scaling rule is hit (see test_models.py).
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}
TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rope_scaling=SCALING)
IDS = torch.randint(0, TINY.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))


def _resolved(config: LlamaConfig) -> LlamaConfig:
    return config.replace(head_dim=config.resolved_head_dim)


def _hf_model(config: LlamaConfig, seed: int = 0):
    """A random transformers LlamaForCausalLM for ``config`` (random norm weights too)."""
    fields = config_to_hf(config)
    if "rope_parameters" not in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        fields.pop("rope_parameters")  # transformers 4
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.05)
    return model


def _ours(config: LlamaConfig, seed: int = 0) -> Llama:
    model = Llama(config)
    model.init_weights(seed=seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out.full_tensor() if hasattr(out, "full_tensor") else out


def _materialised(path: Path) -> Llama:
    model = llama_from_hf(path)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("name", ["llama3_8b", "llama3_1b", "llama2_7b"])
def test_config_round_trip(name: str, tmp_path: Path) -> None:
    config = get_config(name)
    assert config_from_hf(config_to_hf(config)) == config
    # through transformers (which fills in head_dim) and a written config.json
    d = config_to_hf(config, dtype=torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = transformers.AutoConfig.from_pretrained(tmp_path)
        direct = transformers.LlamaConfig(**d)
    assert type(auto).__name__ == "LlamaConfig" and auto.tie_word_embeddings == config.tie_word_embeddings
    assert _resolved(config_from_hf(auto.to_dict())) == _resolved(config)
    assert _resolved(config_from_hf(direct.to_dict())) == _resolved(config)


def test_config_from_published_files() -> None:
    # Llama 3.1 8B (transformers 4 style: rope_theta + rope_scaling, torch_dtype, no head_dim)
    llama31 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
               "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
               "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192,
                                                        "rope_type": "llama3"},
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
               "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "mlp_bias": False}
    assert config_from_hf(llama31) == get_config("llama3_8b")
    # Llama 3.2 1B in transformers 5 style (rope_parameters, dtype, explicit head_dim)
    llama32 = {**{k: v for k, v in llama31.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
               "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
               "tie_word_embeddings": True, "dtype": "bfloat16",
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}}
    assert config_from_hf(llama32) == get_config("llama3_1b")
    # Llama 2 in both styles: plain RoPE
    llama2 = {k: v for k, v in config_to_hf(get_config("llama2_7b")).items() if k not in ("rope_parameters",)}
    assert config_from_hf({**llama2, "rope_scaling": None}) == get_config("llama2_7b")
    v5 = {**llama2, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    del v5["rope_theta"], v5["rope_scaling"]
    assert config_from_hf(v5) == get_config("llama2_7b")
    before_gqa = {k: v for k, v in v5.items() if k != "num_key_value_heads"}  # older configs: kv heads = heads
    assert config_from_hf(before_gqa) == get_config("llama2_7b")


def test_config_rejects_other_models() -> None:
    d = config_to_hf(TINY)
    with pytest.raises(CheckpointError, match="mistral"):
        config_from_hf({**d, "model_type": "mistral"})
    with pytest.raises(CheckpointError, match="yarn"):
        config_from_hf({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None})
    with pytest.raises(CheckpointError, match="attention_bias"):
        config_from_hf({**d, "attention_bias": True})


# ---------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_import_matches_transformers(tied: bool, sharded: bool, tmp_path: Path) -> None:
    hf = _hf_model(TINY.replace(tie_word_embeddings=tied))
    hf.save_pretrained(tmp_path, safe_serialization=True, **({"max_shard_size": "40KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ours = _materialised(tmp_path)
    load_hf_checkpoint(ours, tmp_path)
    assert _resolved(ours.config) == _resolved(TINY.replace(tie_word_embeddings=tied))
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    expected = _hf_logits(hf)
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=1e-5)
    # built and loaded in one call on a real device
    torch.testing.assert_close(_logits(llama_from_hf(tmp_path, device="cpu")), expected, atol=1e-5, rtol=1e-5)


def test_import_into_lightning_module_with_prefix(tmp_path: Path) -> None:
    from lightning_tp import CausalLMModule

    hf = _hf_model(TINY)
    hf.save_pretrained(tmp_path)
    module = CausalLMModule(llama=_materialised(tmp_path))
    load_hf_checkpoint(module, tmp_path, prefix="model.")
    torch.testing.assert_close(_logits(module), _hf_logits(hf), atol=1e-5, rtol=1e-5)


def test_tied_model_with_untied_parameters_gets_the_embedding(tmp_path: Path) -> None:
    config = TINY.replace(tie_word_embeddings=True)
    hf = _hf_model(config)
    hf.save_pretrained(tmp_path)
    model = llama_from_hf(tmp_path)
    model.to_empty(device="cpu")  # unties lm_head from the embedding; no init_weights to tie them again
    model.model.inv_freq.copy_(Llama(config).model.inv_freq)
    load_hf_checkpoint(model, tmp_path)
    torch.testing.assert_close(model.lm_head.weight, hf.model.embed_tokens.weight, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_export_loads_in_transformers(tied: bool, sharded: bool, tmp_path: Path) -> None:
    config = TINY.replace(tie_word_embeddings=tied)
    ours = _ours(config)
    out = tmp_path / "export"
    written = export_hf(ours.state_dict(), config, out, max_shard_bytes=30_000 if sharded else 2 * 1024**3)
    files = sorted(p.name for p in out.iterdir())
    assert written == sorted(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind
    if sharded:
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        expected_keys = set(ours.state_dict()) - ({"lm_head.weight"} if tied else set())
        assert set(index["weight_map"]) == expected_keys and set(index["weight_map"].values()) == set(shards)
        size = sum(t.numel() * t.element_size() for k, t in ours.state_dict().items() if k in expected_keys)
        assert index["metadata"]["total_size"] == size
    else:
        assert files == ["config.json", "model.safetensors"]
    from safetensors import safe_open

    saved = set()
    for f in (f for f in files if f.endswith(".safetensors")):
        with safe_open(str(out / f), "pt") as handle:
            saved.update(handle.keys())
    assert ("lm_head.weight" in saved) == (not tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_hf_logits(hf), _logits(ours), atol=1e-5, rtol=1e-5)
    # and back into our model, exactly
    again = _materialised(out)
    load_hf_checkpoint(again, out)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_export_copies_tokenizer_and_casts(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "hello", "world"])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    out = tmp_path / "out"
    export_hf(_ours(TINY).state_dict(), TINY, out, tokenizer_dir=tok_dir, dtype=torch.bfloat16)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (0, 1, "bfloat16")
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world")["input_ids"][-2:] == [3, 4]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="has 5 tokens but the model.s vocab_size is 4"):
        small = TINY.replace(vocab_size=4)
        export_hf(_ours(small).state_dict(), small, tmp_path / "small", tokenizer_dir=tok_dir)


def test_export_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    ours = _ours(TINY)
    out = tmp_path / "out"
    export_hf(ours.state_dict(), TINY, out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export_hf(ours.state_dict(), TINY, out)
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(_ours(TINY, seed=1).state_dict(), TINY, out, max_shard_bytes=30_000, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    export_hf(_ours(TINY, seed=1).state_dict(), TINY, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before


def test_export_validates_the_state_dict(tmp_path: Path) -> None:
    sd = _ours(TINY).state_dict()
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = sd.pop("model.norm.weight")
    with pytest.raises(CheckpointError) as info:
        export_hf(sd, TINY, tmp_path / "out")
    message = str(info.value)
    assert "model.norm.weight" in message and "extra.weight" in message
    assert "model.layers.0.mlp.up_proj.weight: (3, 3) vs (112, 64)" in message
    assert not (tmp_path / "out").exists()
    tied = TINY.replace(tie_word_embeddings=True)
    sd = {**_ours(tied).state_dict(), "lm_head.weight": torch.zeros(96, 64)}
    with pytest.raises(CheckpointError, match="ties lm_head.weight to model.embed_tokens.weight, but they differ"):
        export_hf(sd, tied, tmp_path / "out")
    assert strip_prefix({"model.a": 1, "b": 2}, "model.") == {"a": 1}


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    export_hf(_ours(TINY).state_dict(), TINY, out, max_shard_bytes=30_000)
    return out


def test_error_shape_mismatch_lists_key_and_shapes(tmp_path: Path) -> None:
    other = TINY.replace(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    export_hf(_ours(other).state_dict(), other, tmp_path)
    model = _ours(TINY)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(model, tmp_path)
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj.weight: model (64, 64) vs checkpoint (32, 32)" in message
    assert "model.embed_tokens.weight: model (96, 64) vs checkpoint (96, 32)" in message
    assert "hidden_size: model 64 vs checkpoint 32" in message
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # nothing loaded


def test_error_config_mismatch_lists_fields(exported: Path) -> None:
    model = _ours(TINY.replace(num_hidden_layers=3, intermediate_size=128, rms_norm_eps=1e-6))
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(model, exported)
    message = str(info.value)
    for text in ("num_hidden_layers: model 3 vs checkpoint 2", "intermediate_size: model 128 vs checkpoint 112",
                 "rms_norm_eps: model 1e-06 vs checkpoint 1e-05", "missing from the checkpoint", "model.layers.2"):
        assert text in message


def test_error_missing_and_unexpected_keys(exported: Path) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((exported / "model.safetensors.index.json").read_text())
    file = exported / index["weight_map"]["model.norm.weight"]
    tensors = load_file(str(file))
    tensors["model.extra.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(file), metadata={"format": "pt"})
    index["weight_map"]["model.extra.weight"] = index["weight_map"].pop("model.norm.weight")
    (exported / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['model.norm.weight'\]") as info:
        load_hf_checkpoint(_ours(TINY), exported)
    assert "unexpected in the checkpoint: ['model.extra.weight']" in str(info.value)


def test_error_missing_shard_names_the_file(exported: Path) -> None:
    shard = sorted(exported.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_hf_checkpoint(_ours(TINY), exported)


@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["data", "header"])
def test_error_truncated_file_names_it(exported: Path, keep: float) -> None:
    shard = sorted(exported.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated or corrupt"):
        load_hf_checkpoint(_ours(TINY), exported)


def test_error_pickle_only_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match=r"only \['pytorch_model.bin'\].*only safetensors"):
        load_hf_checkpoint(_ours(TINY), tmp_path)


def test_error_meta_model_and_missing_config(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="meta device"):
        load_hf_checkpoint(llama_from_hf(exported), exported)
    (exported / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(_ours(TINY), exported)


# ---------------------------------------------------------------------------------------------- DCP checkpoints


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_consolidated_state_dict_round_trip(tied: bool, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    config = TINY.replace(tie_word_embeddings=tied)
    model = _ours(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}},
                 checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    sd = consolidated_state_dict(tmp_path / "ckpt")
    assert set(sd) == set(model.state_dict())
    fresh = Llama(config)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(_logits(fresh.eval()), _logits(model), rtol=0, atol=0)
    export_hf(sd, config, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_hf_logits(hf), _logits(model), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="No tensors under 'state_dict.module.'"):
        consolidated_state_dict(tmp_path / "ckpt", prefix="module.")
    with pytest.raises(CheckpointError, match=r"no \.metadata"):
        consolidated_state_dict(tmp_path / "hf")


# ---------------------------------------------------------------------------------------------- DTensor parameters


class _Holder(nn.Module):
    def __init__(self, llama: Llama) -> None:
        super().__init__()
        self.model = llama

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "tp_fsdp"])
def test_load_into_dtensor_parameters(one_rank, tied: bool, fsdp: bool, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import _utils as dtensor_utils
    from torch.distributed.tensor.parallel import parallelize_module

    from lightning_tp.parallel.fsdp import apply_fsdp
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    config = TINY.replace(tie_word_embeddings=tied)
    hf = _hf_model(config)
    hf.save_pretrained(tmp_path)
    holder = _Holder(llama_from_hf(tmp_path))
    plan = resolve_plan(holder, "auto", sequence_parallel=True, loss_parallel=True)
    if fsdp:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(holder, plan, mesh["tp"])  # keeps the tied weights tied
        apply_fsdp(holder, plan, mesh["dp"])
    else:
        parallelize_module(holder, init_device_mesh("cpu", (1,)), plan.styles)
    holder.to_empty(device="cpu")
    holder.model.init_weights()
    assert all(isinstance(p, DTensor) for p in holder.parameters())
    calls = []
    real = dtensor_utils.compute_local_shape_and_global_offset
    monkeypatch.setattr(dtensor_utils, "compute_local_shape_and_global_offset",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    load_hf_checkpoint(holder, tmp_path, prefix="model")
    assert len(calls) == len(list(holder.parameters()))
    if fsdp:
        assert any(len(placements) == 2 for placements in calls)
    torch.testing.assert_close(_logits(holder), _hf_logits(hf), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- command line


def _dcp_checkpoint(path: Path, model: Llama, meta: dict | None) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}, checkpoint_id=str(path),
                 no_dist=True)
    if meta is not None:
        torch.save(meta, path / "meta.pt")


def test_cli_export_reads_the_config_from_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_tp import cli

    ours = _ours(TINY)
    _dcp_checkpoint(tmp_path / "ckpt", ours, {"hyper_parameters": {"model": dataclasses.asdict(TINY), "lr": 1e-3,
                                                                   "betas": (0.9, 0.95)}})
    cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert "config.json" in out and "model.safetensors" in out and f"{TINY.num_params:,} parameters" in out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_hf_logits(hf), _logits(ours), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="checkpoint was trained with"):
        cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "other"), "--model", "debug"])
    with pytest.raises(SystemExit, match="exists and is not empty"):
        cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])


def test_cli_export_needs_model_without_safe_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_tp import cli

    config = get_config("debug")
    _dcp_checkpoint(tmp_path / "ckpt", _ours(config), {"hyper_parameters": {"model": config}})  # not weights_only
    with pytest.raises(SystemExit, match="--model"):
        cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    (tmp_path / "ckpt" / "meta.pt").unlink()
    with pytest.raises(SystemExit, match="--model"):
        cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--model", "debug", "--max-shard-bytes",
              "100000"])
    assert "model-00001-of-" in capsys.readouterr().out
    # a Hugging Face config.json is accepted as --model too, and import brings the weights back
    cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf2"), "--model", str(tmp_path / "hf")])
    cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    assert "finetune checkpoint=" in capsys.readouterr().out
    from lightning_tp import CausalLMModule
    from lightning_tp.checkpoint.weights import load_weights

    module = CausalLMModule(llama=_materialised(tmp_path / "hf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_weights(module, tmp_path / "imported")
    torch.testing.assert_close(module.model.state_dict(), consolidated_state_dict(tmp_path / "ckpt"), rtol=0, atol=0)
