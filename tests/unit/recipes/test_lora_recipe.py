"""``lightning-tp finetune peft=lora``, single process: the ``peft`` group to PEFT's ``LoraConfig``, the module that
trains only the adapters, base weights loaded from this project's sharded checkpoints and from Hugging Face
directories into the wrapped model, and the checks the recipe runs before any rank is spawned. The same bad inputs
through the whole recipe are in ``tests/unit/test_bad_inputs.py``; one real launch is in
``tests/multiprocess/test_recipes_e2e.py``."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from paths import ROOT

from lightning_tp import TensorParallelStrategy
from lightning_tp.checkpoint.hf import export_hf
from lightning_tp.checkpoint.layout import LAYOUT_KEY, META_FILE
from lightning_tp.checkpoint.weights import base_weights, check_weights_fit, load_weights
from lightning_tp.errors import CheckpointError, PlanError, UnsupportedFeatureError
from lightning_tp.models import Llama, get_config
from lightning_tp.parallel.lora import lora_layers
from lightning_tp.recipes import lora as checks
from lightning_tp.recipes.config import LORA_TARGETS, RecipeConfigError, compose_recipe
from lightning_tp.recipes.report import format_bytes, summary_lines
from lightning_tp.training.module import CausalLMModule, parameter_counts

peft = pytest.importorskip("peft")

DEBUG = get_config("debug")  # hidden 64, 8 query heads and 4 KV heads of 8: k_proj/v_proj are 64 -> 32
SETTINGS = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": list(LORA_TARGETS), "base": None}


def _settings(*overrides: str, checkpoint: str | None = None) -> dict | None:
    cfg = compose_recipe("finetune", ["model=debug", *overrides])
    return checks.lora_settings(cfg.peft, checkpoint)


def _base_llama(seed: int = 3) -> Llama:
    llama = Llama(DEBUG)
    llama.init_weights(seed=seed)
    return llama


def _materialised(lora: dict = SETTINGS, seed: int = 1) -> CausalLMModule:
    module = CausalLMModule("debug", lora=lora, init_seed=seed, max_steps=10)
    module.configure_model()  # no device mesh: materialised and initialised here
    return module


def _projection(module: CausalLMModule, layer: int = 0, name: str = "self_attn.q_proj") -> torch.nn.Module:
    return module.model.base_model.model.model.layers[layer].get_submodule(name)


# ---------------------------------------------------------------------------------------------------- config


def test_the_lora_group_becomes_pefts_lora_config(tmp_path: Path) -> None:
    """The command line of the issue, through the config group, to ``LoraConfig`` on the wrapped model; the base
    checkpoint's absolute path is the config's ``base_model_name_or_path`` (what an export of the adapters records
    and ``export --merged`` starts from)."""
    lora = _settings("peft=lora", "peft.rank=16", "peft.alpha=32", "peft.dropout=0.05",
                     "peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                     checkpoint=str(tmp_path / "base"))
    assert lora == {"rank": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": LORA_TARGETS,
                    "base": str((tmp_path / "base").resolve())}
    assert _settings("peft=lora") == {**lora, "base": None}  # the group's defaults are the values
    module = CausalLMModule("debug", lora=lora)
    assert isinstance(module.model, peft.PeftModel)
    config = module.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32.0, 0.05)
    assert config.target_modules == set(LORA_TARGETS)
    assert config.base_model_name_or_path == lora["base"]
    assert module.hparams["lora"] == lora  # plain data, saved with the checkpoint
    # every projection of both layers has an adapter, and nothing else does
    assert sorted(lora_layers(module)) == sorted(f"model.base_model.model.model.layers.{i}.{p}" for i in range(2)
                                                 for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                           "mlp.down_proj"))


def test_peft_none_is_full_fine_tuning() -> None:
    assert _settings() is None and _settings("peft=none") is None
    module = CausalLMModule("debug", lora=None)
    assert not lora_layers(module) and module.hparams["lora"] is None
    counts = parameter_counts(module)
    assert counts["trainable"] == counts["total"] == DEBUG.num_params


def test_only_the_adapters_train_and_their_count_is_r_times_in_plus_out() -> None:
    module = _materialised()
    counts = parameter_counts(module)
    # per layer: q (64->64), k, v (64->32), o (64->64), gate, up (64->192), down (192->64); r * (in + out) each
    per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 192) + (192 + 64))
    assert counts["trainable"] == DEBUG.num_hidden_layers * per_layer
    assert counts["total"] == DEBUG.num_params + counts["trainable"]
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for n, p in module.named_parameters() if ".lora_" in n}
    assert in_optimizer == adapters  # nothing frozen reaches AdamW
    assert all(group["weight_decay"] == module.hparams["weight_decay"] for group in optimizer.param_groups)


def test_the_wrapped_model_computes_the_base_plus_scaled_adapters() -> None:
    """Against the merged weight computed by hand: ``W + (alpha / r) B A`` for every projection."""
    module = _materialised()
    torch.manual_seed(0)
    for layer in lora_layers(module).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # B starts at zero: make it count
    merged = Llama(DEBUG)
    merged.init_weights(seed=0)
    with torch.no_grad():
        state = module.model.base_model.model.state_dict()
        for name, param in merged.named_parameters():
            wrapped = name.replace(".weight", ".base_layer.weight")
            if wrapped in state:
                a, b = state[wrapped.replace("base_layer", "lora_A.default")], state[
                    wrapped.replace("base_layer", "lora_B.default")]
                param.copy_(state[wrapped] + (8.0 / 4) * b @ a)
            else:
                param.copy_(state[name])
    ids = torch.randint(0, DEBUG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(module(ids), merged(ids), rtol=1e-5, atol=1e-5)


def test_adapters_start_as_pefts_own_init_after_the_base_init() -> None:
    """``init_weights`` of the Llama reaches the adapters' ``nn.Linear`` too; they are reset after it: ``B`` zero
    (the wrapped model starts as the base), ``A`` random and the same for the same seed."""
    one, two, other = _materialised(seed=1), _materialised(seed=1), _materialised(seed=2)
    for module in (one, two, other):
        assert all(torch.count_nonzero(layer.lora_B["default"].weight) == 0 for layer in lora_layers(module).values())
    a = [_projection(m).lora_A["default"].weight for m in (one, two, other)]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2]) and a[0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- base weights


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Llama, Path, Path]:
    """The debug Llama as this project's sharded checkpoint (as pretraining saves it, keyed ``model.``) and as a
    Hugging Face directory."""
    root = tmp_path_factory.mktemp("base")
    llama = _base_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        dcp.save({"state_dict": {f"model.{k}": v for k, v in llama.state_dict().items()}},
                 checkpoint_id=str(root / "sharded"), no_dist=True)
    torch.save({"hyper_parameters": {"model": dataclasses.asdict(DEBUG)}}, root / "sharded" / META_FILE)
    export_hf(llama.state_dict(), DEBUG, root / "hf")
    return llama, root / "sharded", root / "hf"


def test_the_base_view_names_tensors_as_the_plain_model_and_shares_them() -> None:
    module = CausalLMModule("debug", lora=SETTINGS)
    view = base_weights(module)
    plain = CausalLMModule("debug")
    assert sorted(view.state_dict()) == sorted(plain.state_dict())
    assert view.llama_roots == ["model"] and view.model.config == DEBUG
    wrapped = _projection(module).base_layer.weight
    assert view.get_parameter("model.model.layers.0.self_attn.q_proj.weight") is wrapped  # nothing copied
    assert base_weights(plain) is None


@pytest.mark.parametrize("kind", ["sharded", "hf"])
def test_load_weights_fills_the_base_and_leaves_the_adapters(kind: str, base_checkpoints) -> None:
    llama, sharded, hf = base_checkpoints
    path = sharded if kind == "sharded" else hf
    module = _materialised()
    check_weights_fit(CausalLMModule("debug", lora=SETTINGS), path)  # on meta, as the launching process runs it
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_weights(module, path)
    base = module.model.base_model.model
    for name, expected in llama.state_dict().items():
        owner = base.get_submodule(name.rpartition(".")[0])
        got = owner.base_layer.weight if hasattr(owner, "base_layer") else base.get_parameter(name)
        assert torch.equal(got, expected), name
    assert all(torch.equal(p, adapters[n]) for n, p in module.named_parameters() if p.requires_grad)
    ids = torch.randint(0, DEBUG.vocab_size, (1, 8))
    torch.testing.assert_close(module(ids), llama(ids), rtol=0, atol=0)  # B = 0: the base's own logits


def test_a_base_of_another_shape_names_the_plain_tensor(base_checkpoints) -> None:
    _, sharded, _ = base_checkpoints
    wider = CausalLMModule(dataclasses.replace(DEBUG, intermediate_size=128), lora=SETTINGS)
    with pytest.raises(CheckpointError, match=r"model\.model\.layers\.0\.mlp\.down_proj\.weight: model \(64, 128\)"):
        check_weights_fit(wider, sharded)


def _adapters_only(path: Path, base: str | None = None, rank: int = 16) -> Path:
    """What a LoRA run's training checkpoint looks like to the recipe: DCP shards of adapters, and ``meta.pt`` with
    the strategy's layout (``adapters_only``, the PEFT config)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": {"model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight":
                                 torch.zeros(rank, 64)}}, checkpoint_id=str(path), no_dist=True)
    config = {"r": rank, "lora_alpha": 32, "target_modules": sorted(LORA_TARGETS), "base_model_name_or_path": base}
    torch.save({LAYOUT_KEY: {"format": 1, "adapters_only": True, "peft": {"model": {"default": config}}},
                "hyper_parameters": {"model": "debug"}}, path / META_FILE)
    return path


def test_an_adapter_only_checkpoint_is_no_base(tmp_path: Path) -> None:
    path = _adapters_only(tmp_path / "lora", base="/runs/base")
    for module in (CausalLMModule("debug", lora=SETTINGS), CausalLMModule("debug")):
        with pytest.raises(CheckpointError) as info:
            check_weights_fit(module, path)
        message = str(info.value)
        assert f"checkpoint={str(path)!r} holds LoRA adapters only" in message
        assert "checkpoint=/runs/base" in message and f"resume={str(path)!r}" in message


# ---------------------------------------------------------------------------------------------------- before spawn


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["peft.method=qlora"], ["peft.method='qlora'", "Fix: peft=lora"]),
    (["peft=lora", "peft.rank=0"], ["peft.rank=0 must be a positive int"]),
    (["peft=lora", "peft.rank=-4", "peft.dropout=1.0", "peft.alpha=0"],  # every problem at once
     ["peft.rank=-4", "peft.dropout=1.0 must be in [0, 1)", "peft.alpha=0"]),
    (["peft=lora", "peft.target_modules=[]"], ["peft.target_modules=[] must be a non-empty list"]),
])
def test_bad_settings_name_the_key(overrides: list[str], fragments: list[str]) -> None:
    with pytest.raises(RecipeConfigError) as info:
        _settings(*overrides)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_a_target_that_matches_nothing_or_a_rank_too_wide() -> None:
    with pytest.raises(RecipeConfigError) as info:
        checks.check_lora_targets(DEBUG, {**SETTINGS, "target_modules": ["q_proj", "qproj", "attn"], "rank": 40})
    message = str(info.value)
    # PEFT itself would ignore both, since q_proj matches
    assert "peft.target_modules: 'qproj' (did you mean 'q_proj' or 'v_proj'?), 'attn' match no module" in message
    assert f"whose projections are {sorted(LORA_TARGETS)}" in message  # lm_head is not offered
    assert "peft.rank=40 is larger than" not in message  # q_proj is 64 wide
    with pytest.raises(RecipeConfigError) as info:
        checks.check_lora_targets(DEBUG, {**SETTINGS, "rank": 40})
    assert "peft.rank=40 is larger than k_proj (64 in, 32 out), v_proj (64 in, 32 out)" in str(info.value)
    assert "Fix: peft.rank=32 or less" in str(info.value)
    checks.check_lora_targets(DEBUG, {**SETTINGS, "rank": 32})  # as wide as k_proj: allowed
    checks.check_lora_targets(DEBUG, {**SETTINGS, "target_modules": ["self_attn.q_proj"]})  # PEFT's suffix rule


@pytest.mark.parametrize("target", ["input_layernorm", "embed_tokens", "norm"])
def test_a_target_that_is_not_a_projection_is_a_plan_error(target: str) -> None:
    with pytest.raises(PlanError, match=f"remove '{target}' from peft.target_modules"):
        checks.check_lora_targets(DEBUG, {**SETTINGS, "target_modules": ["q_proj", target]})


def test_lm_head_adapters_are_refused_by_the_plan_before_spawn() -> None:
    """Under sequence parallelism ``lm_head``'s input arrives sequence-sharded, which no adapter layout follows; the
    recipe refuses it at tp 1 too, where nothing is split, so that the same command line runs at every tp."""
    lora = {**SETTINGS, "target_modules": ["q_proj", "lm_head"]}
    checks.check_lora_targets(DEBUG, lora)  # a projection: only the plan refuses it
    strategy = TensorParallelStrategy(tensor_parallel_size=1)  # SP and loss parallel: the defaults
    with pytest.raises(PlanError) as info:
        checks.check_lora_plan(CausalLMModule("debug", lora=lora), strategy, lora)
    assert "peft.target_modules=['q_proj', 'lm_head']" in str(info.value)
    assert "remove 'lm_head' from peft.target_modules" in str(info.value)
    checks.check_lora_plan(CausalLMModule("debug", lora=SETTINGS), strategy, SETTINGS)


def test_without_peft_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(UnsupportedFeatureError, match=r'peft=lora needs PEFT .* pip install "lightning-tp\[lora\]"'):
        _settings("peft=lora")
    assert _settings("peft=none") is None  # full fine-tuning never imports it


def test_resume_must_hold_the_runs_own_adapters(tmp_path: Path) -> None:
    base = str(tmp_path / "base")
    lora = {**SETTINGS, "rank": 16, "alpha": 32.0, "base": base}
    same = str(_adapters_only(tmp_path / "same", base=base))
    checks.check_resume(same, lora)
    checks.check_resume(None, lora)
    with pytest.raises(CheckpointError, match="peft.rank=8 there, 16 here"):
        checks.check_resume(str(_adapters_only(tmp_path / "r8", base=base, rank=8)), lora)
    with pytest.raises(CheckpointError, match=f"checkpoint={tmp_path / 'other'} there"):
        checks.check_resume(str(_adapters_only(tmp_path / "other-base", base=str(tmp_path / "other"))), lora)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters only, and this run trains every weight"):
        checks.check_resume(same, None)
    full = tmp_path / "full"
    full.mkdir()
    torch.save({LAYOUT_KEY: {"format": 1, "adapters_only": False, "peft": {}}}, full / META_FILE)
    with pytest.raises(CheckpointError, match="is a full fine-tuning checkpoint"):
        checks.check_resume(str(full), lora)
    checks.check_resume(str(full), None)


# ---------------------------------------------------------------------------------------------------- report


def test_the_summary_says_what_trains_and_what_the_checkpoint_holds() -> None:
    summary = {"steps": 4, "wall_time_s": 12.0, "world_size": 2, "lora": {"rank": 16},
               "parameters": {"trainable": 4_884_480, "total": 139_399_488, "total_bytes": 557_597_952},
               "checkpoint_bytes": 58_700_000}
    (_, line) = summary_lines(summary)
    assert line == ("[lightning-tp] LoRA rank 16: 4,884,480 of 139,399,488 parameters trained (3.50%); checkpoint"
                    " 58.7 MB (adapters and their optimizer state) against 558 MB of weights in the full model")
    assert len(summary_lines({**summary, "lora": None})) == 1
    assert [format_bytes(v) for v in (512, 14_600, 1.2e9)] == ["512 B", "14.6 kB", "1.2 GB"]
    assert checks.describe(SETTINGS, {"trainable": 25, "total": 1000}).endswith(
        "on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: 25 of 1,000 parameters train (2.50%);"
        " the base is frozen")


def test_the_group_files_name_every_method() -> None:
    assert sorted(p.stem for p in (ROOT / "lightning_tp" / "conf" / "peft").glob("*.yaml")) == sorted(
        checks.PEFT_METHODS)
