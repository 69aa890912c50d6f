"""Single-process tests of the native Llama (:mod:`lightning_tp.models`): presets, config checks, parameter
counts, meta-device initialisation, module names, and numerical parity with Hugging Face transformers."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from _ci_deps import require

import lightning_tp.models.llama as llama_module
from lightning_tp.models import PRESETS, Llama, LlamaConfig, get_config, list_presets
from lightning_tp.models.llama import RMSNorm, rope_inv_freq

# Llama 3.1 scaling with a short original context, so that every branch of the scaling rule (kept, smoothly
# interpolated, divided by `factor`) is hit by a head_dim of 16 and theta 10000: wavelengths 6.3 < 16 (kept),
# 19.9 and 62.8 in [16, 64] (interpolated), 198 and up > 64 (scaled).
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- presets


def test_every_preset_resolves() -> None:
    names = list_presets()
    assert names == list(PRESETS)
    assert {"debug", "small", "llama2_7b", "llama3_8b", "llama3_70b"} <= set(names)
    for name in names:
        config = get_config(name)
        assert isinstance(config, LlamaConfig)
        assert config is PRESETS[name]
    # overrides give a validated copy and leave the preset untouched
    changed = get_config("debug", num_hidden_layers=3)
    assert changed.num_hidden_layers == 3 and get_config("debug").num_hidden_layers == 2


def test_preset_typo_lists_names_and_suggests() -> None:
    with pytest.raises(KeyError) as info:
        get_config("llama3_8")
    message = str(info.value)
    assert "'llama3_8'" in message
    for name in list_presets():
        assert name in message
    assert "Did you mean 'llama3_8b'" in message


def test_known_preset_parameter_counts() -> None:
    # Published sizes: Llama 2 7B has 6,738,415,616 parameters and Llama 3 8B 8,030,261,248.
    assert get_config("llama2_7b").num_params == 6_738_415_616
    assert get_config("llama3_8b").num_params == 8_030_261_248


# ---------------------------------------------------------------------------------------------- config validation


def test_config_rejects_heads_not_multiple_of_kv_heads() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads") as info:
        LlamaConfig(num_attention_heads=8, num_key_value_heads=3)
    assert "num_attention_heads" in str(info.value)


def test_config_rejects_unsupported_rope_scaling_type() -> None:
    with pytest.raises(ValueError, match="rope_scaling") as info:
        LlamaConfig(rope_scaling={**SCALING, "rope_type": "yarn"})
    assert "yarn" in str(info.value)


def test_config_rejects_incomplete_rope_scaling() -> None:
    incomplete = {k: v for k, v in SCALING.items() if k != "factor"}
    with pytest.raises(ValueError, match="rope_scaling") as info:
        LlamaConfig(rope_scaling=incomplete)
    assert "factor" in str(info.value)


def test_config_rejects_non_positive_sizes_and_replace_validates() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig(vocab_size=0)
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig(hidden_size=60, num_attention_heads=8)  # 60 / 8 is not an integer head dim
    with pytest.raises(ValueError, match="num_key_value_heads"):
        get_config("debug").replace(num_key_value_heads=3)
    # an explicit head_dim makes the same widths valid
    config = LlamaConfig(hidden_size=60, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    assert config.resolved_head_dim == 16


# ---------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_num_params_matches_model_debug(tied: bool) -> None:
    config = get_config("debug", tie_word_embeddings=tied)
    model = Llama(config)
    assert config.num_params == _n_params(model)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert config.num_params == get_config("debug").num_params - config.vocab_size * config.hidden_size


@pytest.mark.parametrize("name", ["llama3_8b", "llama3_1b"])
def test_num_params_matches_meta_model(name: str) -> None:
    config = get_config(name)
    with torch.device("meta"):
        model = Llama(config)
    assert all(p.is_meta for p in model.parameters())
    assert config.num_params == _n_params(model)


@pytest.mark.parametrize("name", ["debug", "llama3_1b", "llama3_8b"])
@pytest.mark.parametrize("seq_len", [128, 4096])
def test_flops_per_token_hand_formula(name: str, seq_len: int) -> None:
    config = get_config(name)
    with torch.device("meta"):
        n = _n_params(Llama(config))  # counted from the model, not from config.num_params
    v, h, layers = config.vocab_size, config.hidden_size, config.num_hidden_layers
    heads, head_dim = config.num_attention_heads, config.resolved_head_dim
    expected = 6 * (n - v * h) + 12 * layers * heads * head_dim * seq_len
    assert config.flops_per_token(seq_len) == expected


# ---------------------------------------------------------------------------------------------- meta init


def _meta_built(config: LlamaConfig, seed: int) -> Llama:
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_meta_build_then_init_weights(tied: bool) -> None:
    config = get_config("debug", rope_scaling=SCALING, tie_word_embeddings=tied)
    model = _meta_built(config, seed=0)

    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * config.num_hidden_layers + 1
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    for weight in (model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].mlp.down_proj.weight,
                   model.model.embed_tokens.weight):
        assert abs(weight.std().item() - config.initializer_range) < 0.15 * config.initializer_range
        assert abs(weight.mean().item()) < 0.1 * config.initializer_range
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert abs(model.lm_head.weight.std().item() - config.initializer_range) < 0.15 * config.initializer_range

    # the RoPE buffer is recomputed, equal to the one of a model built directly on the CPU
    fresh = Llama(config)
    torch.testing.assert_close(model.model.inv_freq, fresh.model.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(model.model.inv_freq, rope_inv_freq(config), rtol=0, atol=0)


def test_init_weights_seed_is_deterministic() -> None:
    config = get_config("debug")
    a, b, c = _meta_built(config, seed=0), _meta_built(config, seed=0), _meta_built(config, seed=1)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert not torch.equal(state_a["model.layers.0.self_attn.q_proj.weight"],
                           state_c["model.layers.0.self_attn.q_proj.weight"])
    # distinct parameters draw distinct numbers from the one generator
    assert not torch.equal(state_a["model.layers.0.mlp.gate_proj.weight"], state_a["model.layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------------------------------------- names, RoPE


def test_module_names_match_hugging_face() -> None:
    config = get_config("debug")
    names = dict(Llama(config).named_modules())
    expected = ["model", "model.embed_tokens", "model.layers", "model.norm", "lm_head"]
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        expected += [layer, f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm", f"{layer}.self_attn",
                     f"{layer}.mlp"]
        expected += [f"{layer}.self_attn.{p}_proj" for p in "qkvo"]
        expected += [f"{layer}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    missing = [n for n in expected if n not in names]
    assert not missing
    assert f"model.layers.{config.num_hidden_layers}" not in names
    assert isinstance(names["lm_head"], torch.nn.Linear) and names["lm_head"].bias is None


def test_rope_scaling_changes_inv_freq() -> None:
    plain = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16
    scaled = plain.replace(rope_scaling=SCALING)
    base, freq = rope_inv_freq(plain), rope_inv_freq(scaled)
    assert base.shape == freq.shape == (8,)
    wavelen = 2 * math.pi / base.double()
    old = SCALING["original_max_position_embeddings"]
    kept = wavelen < old / SCALING["high_freq_factor"]
    divided = wavelen > old / SCALING["low_freq_factor"]
    medium = ~kept & ~divided
    assert kept.any() and divided.any() and medium.any()  # the config exercises all three branches
    torch.testing.assert_close(freq[kept], base[kept])
    torch.testing.assert_close(freq[divided], base[divided] / SCALING["factor"])
    # interpolated frequencies lie strictly between the scaled and unscaled ones
    assert ((freq[medium] < base[medium]) & (freq[medium] > base[medium] / SCALING["factor"])).all()


def test_model_file_has_no_torch_distributed() -> None:
    source = Path(inspect.getfile(llama_module)).read_text()
    assert "class Llama(" in source
    assert "torch.distributed" not in source
    assert not re.search(r"^\s*(from|import)\s+\S*distributed", source, flags=re.MULTILINE)


# ---------------------------------------------------------------------------------------------- HF parity


def _hf_config(config: LlamaConfig):
    transformers = require("transformers")
    fields = dataclasses.asdict(config)
    rope_theta, rope_scaling = fields.pop("rope_theta"), fields.pop("rope_scaling")
    fields.pop("initializer_range")
    parameters = inspect.signature(transformers.LlamaConfig.__init__).parameters
    if "rope_parameters" in parameters:  # transformers >= 5
        rope = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
        fields["rope_parameters"] = rope
    else:
        fields["rope_theta"], fields["rope_scaling"] = rope_theta, rope_scaling
    return transformers.LlamaConfig(**fields, attention_bias=False, mlp_bias=False, hidden_act="silu",
                                    attention_dropout=0.0)


PARITY_CONFIGS = {
    "gqa": LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2),
    "llama31_scaling": LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                   rope_scaling={**SCALING, "original_max_position_embeddings": 32}),
    "tied_explicit_head_dim": LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                          head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                          rope_theta=500000.0, rope_scaling=SCALING),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_hugging_face(name: str) -> None:
    transformers = require("transformers")
    config = PARITY_CONFIGS[name]
    torch.manual_seed(0)
    ours = Llama(config)
    ours.init_weights(seed=0)
    # random norm weights so that a norm applied with the wrong weight would show
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    ours.eval()

    hf = transformers.LlamaForCausalLM(_hf_config(config)).eval()
    state = ours.state_dict()
    hf_keys = set(hf.state_dict())
    assert set(state) == hf_keys, (set(state) ^ hf_keys)
    result = hf.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    # the RoPE frequencies agree (HF computes them from the same config, including Llama 3.1 scaling)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq.float(), ours.model.inv_freq, atol=0, rtol=1e-6)

    input_ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=input_ids, use_cache=False).logits
        actual = ours(input_ids)
    assert actual.shape == (2, 64, config.vocab_size)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_hf_parity_detects_rope_scaling() -> None:
    """The parity check can fail: an HF model without the scaling gives different logits at seq 64."""
    transformers = require("transformers")
    config = PARITY_CONFIGS["llama31_scaling"]
    ours = Llama(config)
    ours.init_weights(seed=0)
    ours.eval()
    assert not torch.allclose(ours.model.inv_freq, rope_inv_freq(config.replace(rope_scaling=None)))
    hf = transformers.LlamaForCausalLM(_hf_config(config.replace(rope_scaling=None))).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    input_ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(input_ids=input_ids, use_cache=False).logits - ours(input_ids)).abs().max().item()
    assert diff > 1e-4


def test_rms_norm_gradients_and_saved_bytes() -> None:
    from lightning_tp.models.llama import RMSNorm, _RMSNormFunction

    x = torch.randn(2, 5, 16, dtype=torch.double, requires_grad=True)
    w = torch.rand(16, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, w))

    norm = RMSNorm(64, 1e-5)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    norm = norm.to(torch.bfloat16)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16, requires_grad=True)

    def autograd_reference(x: torch.Tensor) -> torch.Tensor:  # the fp32 recipe, differentiated by autograd
        x32 = x.float()
        return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = norm(x)
    # the bf16 input, the weight and one fp32 scale per token; no fp32 copy of the activations
    assert sum(storages.values()) == x.numel() * 2 + 64 * 2 + 2 * 32 * 4
    expected = autograd_reference(x)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, norm.weight), grad)
    theirs = torch.autograd.grad(expected, (x, norm.weight), grad)
    assert torch.equal(out, expected)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------- GPU tier: the sharded init path

_GPU_INIT = '''
import json, sys

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tp import CausalLMModule, TensorParallelStrategy

out = {}
for name, seed in (("a", 7), ("b", 7), ("c", 8)):
    module = CausalLMModule("debug", init_seed=seed)  # built on the meta device by configure_model
    trainer = L.Trainer(accelerator="cuda", devices=1, max_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        strategy=TensorParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, 17, dtype=torch.long)), batch_size=2))
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu()
            for n, p in module.named_parameters()}
    torch.save(full, f"{sys.argv[1]}/{name}.pt")
'''


@pytest.mark.gpu  # skipped where no CUDA device is visible (tests/conftest.py)
def test_gpu_init_of_sharded_meta_weights_is_seeded_and_distributed_as_documented(tmp_path: Path) -> None:
    """On GPUs the strategy shards the meta-device model first and each rank initialises only its shards (on CPU
    it initialises the full model before sharding, which tests/multiprocess/test_parity.py compares with one process).
    Here that path runs: the weights are finite with the documented distribution, the same ``init_seed`` gives the
    same weights, and another seed other weights."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _GPU_INIT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b, c = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abc")
    config = get_config("debug")
    assert a.keys() == b.keys() == c.keys() and len(a) == 3 + 9 * config.num_hidden_layers
    for name, weight in a.items():
        assert torch.isfinite(weight).all(), name
        assert torch.equal(weight, b[name]), name  # same seed, same weights
        if "norm" in name:
            assert torch.equal(weight, torch.ones_like(weight)), name
        else:
            assert abs(weight.std().item() - config.initializer_range) < 0.15 * config.initializer_range, name
            assert not torch.equal(weight, c[name]), name  # another seed
    # distinct parameters draw distinct numbers (no two projections, or shards, repeat one stream)
    assert not torch.equal(a["model.model.layers.0.mlp.gate_proj.weight"], a["model.model.layers.0.mlp.up_proj.weight"])
