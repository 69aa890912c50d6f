"""``lightning-tp export --adapters | --merged`` (:mod:`lightning_tp.checkpoint.adapters`), single process: real
adapter checkpoints written by ``Trainer(strategy=TensorParallelStrategy())`` on one CPU device, for a transformers
Llama and for the native ``Llama`` wrapped in PEFT, exported and loaded back by PEFT and transformers themselves.

The references are independent of the export: the trained module's own logits, PEFT's ``save_pretrained`` of the
trained adapters (files) and PEFT's ``merge_and_unload`` (merged weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _ci_deps import require
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tp import TensorParallelStrategy, cli
from lightning_tp.checkpoint.adapters import export_adapters, peft_key
from lightning_tp.checkpoint.hf import export_hf, import_hf
from lightning_tp.errors import CheckpointError
from lightning_tp.models import Llama, LlamaConfig

transformers = require("transformers")
peft = require("peft")
from safetensors.torch import load_file  # noqa: E402 - after the dependency check

VOCAB, SEQ = 64, 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
TOKENS = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(5))
PROBE = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(6))
EXACT = dict(rtol=0, atol=1e-5)  # the bound on logits


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


class Lit(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids)
        return getattr(out, "logits", out)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        return F.cross_entropy(self.logits(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(0, 1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)


def train(model: torch.nn.Module, checkpoint: Path) -> dict[str, Any]:
    """Two AdamW steps under the strategy on one CPU device, then its adapter-only checkpoint; the trained module's
    logits on PROBE and its trainable parameters (full tensors)."""
    lit = Lit(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, strategy=TensorParallelStrategy())
    trainer.fit(lit, DataLoader(TensorDataset(TOKENS), batch_size=2))
    trainer.save_checkpoint(checkpoint)
    lit.eval()
    with torch.no_grad():
        logits = full(lit.logits(PROBE))
    trained = {n: full(p) for n, p in lit.model.named_parameters() if p.requires_grad}
    torch.distributed.destroy_process_group()  # the strategy's 1-rank group: later tests open their own
    return {"logits": logits, "trained": trained}


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROBE).logits.float()


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A transformers Llama loaded from a directory (so PEFT records it as base_model_name_or_path), adapter
    ``default`` on every projection, plain scaling."""
    tmp = tmp_path_factory.mktemp("hf_run")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, head_dim=8)).save_pretrained(tmp / "base")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp / "base"), config)
    return {"tmp": tmp, "base": tmp / "base", "config": config, **train(model, tmp / "ckpt")}


@pytest.fixture(scope="module")
def native_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The native Llama, adapter ``sft`` with rsLoRA, a rank_pattern and an alpha_pattern, no recorded base; its base
    as a Hugging Face directory and as this project's sharded checkpoint (``lightning-tp import``)."""
    tmp = tmp_path_factory.mktemp("native_run")
    torch.manual_seed(0)
    llama = Llama(LlamaConfig(**SHAPE))
    llama.init_weights(seed=0)
    export_hf(llama.state_dict(), llama.config, tmp / "base_hf")
    import_hf(tmp / "base_hf", tmp / "base_sharded")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                             use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    model = peft.get_peft_model(llama, config, adapter_name="sft")
    return {"tmp": tmp, **train(model, tmp / "ckpt")}


def test_peft_key_drops_the_adapter_name_as_peft_does() -> None:
    model = peft.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, head_dim=8)),
                                peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="sft")
    ours = {peft_key(k, "sft") for k in model.state_dict() if ".lora_" in k}
    assert ours == set(peft.get_peft_model_state_dict(model, adapter_name="sft"))
    assert peft_key("m.sft.lora_A.sft.weight", "sft") == "m.sft.lora_A.weight"  # a module named like the adapter


def test_adapters_are_peft_files_and_load_with_equal_logits(hf_run: dict[str, Any]) -> None:
    tmp, base = hf_run["tmp"], hf_run["base"]
    out = export_adapters(tmp / "ckpt", tmp / "adapters")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # PEFT's own writer, given the trained adapters
    reference = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), hf_run["config"])
    missing, unexpected = reference.load_state_dict(hf_run["trained"], strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    reference.save_pretrained(tmp / "reference")
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(tmp / "reference/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * len(TARGETS) * SHAPE["num_hidden_layers"]
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (out, tmp / "reference"))
    assert {**ours, "target_modules": sorted(ours["target_modules"])} == {  # a set: PEFT writes it in any order
        **theirs, "target_modules": sorted(theirs["target_modules"])}

    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), out)
    torch.testing.assert_close(hf_logits(loaded), hf_run["logits"], **EXACT)
    # the adapters change the logits, so the comparison above can fail
    assert (hf_logits(transformers.LlamaForCausalLM.from_pretrained(base)) - hf_run["logits"]).abs().max() > 1e-2


def test_merged_from_the_recorded_base_loads_with_equal_logits(hf_run: dict[str, Any]) -> None:
    tmp, base = hf_run["tmp"], hf_run["base"]
    cli.main(["export", str(tmp / "ckpt"), str(tmp / "merged"), "--merged"])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(hf_logits(merged), hf_run["logits"], **EXACT)
    # PEFT's merge of the same adapters
    adapters = export_adapters(tmp / "ckpt", tmp / "to_merge")
    theirs = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), adapters)
    theirs = theirs.merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)


def test_native_llama_non_default_adapter_rslora_patterns(native_run: dict[str, Any]) -> None:
    tmp = native_run["tmp"]
    out = export_adapters(tmp / "ckpt", tmp / "adapters", base=tmp / "base_hf")
    assert [p.name for p in out.iterdir()] == ["sft"]  # PEFT keeps a non-default adapter in a folder of its name
    config = json.loads((out / "sft/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp / "base_hf") and config["inference_mode"] is True
    assert config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp / "base_hf"),
                                            out / "sft", adapter_name="sft")
    layer = loaded.base_model.model.model.layers[0]
    assert layer.self_attn.v_proj.r["sft"] == 2 and layer.mlp.down_proj.scaling["sft"] == 3 / 2
    torch.testing.assert_close(hf_logits(loaded), native_run["logits"], **EXACT)

    # from this project's sharded checkpoint of the base
    export_adapters(tmp / "ckpt", tmp / "merged", merged=True, base=tmp / "base_sharded")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp / "merged")
    torch.testing.assert_close(hf_logits(merged), native_run["logits"], **EXACT)
    assert not list(tmp.glob(".*"))  # the base's temporary export is gone


def test_fused_projections(tmp_path: Path) -> None:
    """Phi-3's fused qkv_proj and gate_up_proj: at tp 1 the plan is not applied, so lora_B keeps the model's row
    order (at tp > 1 the fused style stores it grouped and the export restores the order: the multi-process tests)."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**SHAPE, "num_hidden_layers": 1}, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=1)
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                           init_lora_weights=False)
    run = train(peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora),
                tmp_path / "ckpt")
    export_adapters(tmp_path / "ckpt", tmp_path / "adapters")
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapters")
    torch.testing.assert_close(hf_logits(loaded), run["logits"], **EXACT)
    export_adapters(tmp_path / "ckpt", tmp_path / "merged", merged=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "Phi3ForCausalLM"
    torch.testing.assert_close(hf_logits(merged), run["logits"], **EXACT)


def test_a_fused_family_trained_at_tp_1_exports_in_its_own_row_order(tmp_path: Path) -> None:
    """Full fine-tuning of Phi-3 at tp 1 (the plan, with its grouped row order, is not applied) exported with
    ``lightning-tp export``: the weights are already in the model's order and must not be reordered again."""
    from lightning_tp.checkpoint.hf_family import export_transformers

    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**SHAPE, "num_hidden_layers": 1}, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=1)
    run = train(transformers.Phi3ForCausalLM(config), tmp_path / "ckpt")
    export_transformers(tmp_path / "ckpt", tmp_path / "hf")
    torch.testing.assert_close(hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")),
                               run["logits"], **EXACT)


def test_tied_embeddings_stay_out_of_an_adapter_checkpoint(tmp_path: Path) -> None:
    """With tied embeddings the frozen ``lm_head.weight`` is a second name of ``embed_tokens.weight``; an adapter
    checkpoint leaves out both names (``ignore_frozen_params`` alone keeps the alias), and adapters-and-export still
    give the trained logits."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, head_dim=8, tie_word_embeddings=True))
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    run = train(peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), config),
                tmp_path / "ckpt")
    keys = torch.distributed.checkpoint.FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("state_dict.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys
    export_adapters(tmp_path / "ckpt", tmp_path / "adapters")
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapters")
    torch.testing.assert_close(hf_logits(loaded), run["logits"], **EXACT)


def test_bad_inputs_name_the_flag(hf_run: dict[str, Any], native_run: dict[str, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    tmp = native_run["tmp"]
    with pytest.raises(CheckpointError, match="--adapters: .* holds no LoRA adapters"):
        export_adapters(tmp / "base_sharded", tmp / "x")
    with pytest.raises(CheckpointError, match="--merged needs the base weights.*pass --base DIR"):
        export_adapters(tmp / "ckpt", tmp / "x", merged=True)
    with pytest.raises(CheckpointError, match="--merged: .* is an adapter checkpoint itself"):
        export_adapters(tmp / "ckpt", tmp / "x", merged=True, base=tmp / "ckpt")
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SHAPE, "intermediate_size": 48}, head_dim=8))
    other.save_pretrained(tmp / "other")
    with pytest.raises(CheckpointError, match=r"does not fit the adapters: .*mlp.gate_proj.weight: \(48, 32\) in the"
                                              r" base, the adapters \(rank 4\) need \(64, 32\).*--base"):
        export_adapters(hf_run["tmp"] / "ckpt", tmp / "x", merged=True, base=tmp / "other")
    assert not (tmp / "x").exists() and not list(tmp.glob(".*"))
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        export_adapters(tmp / "ckpt", tmp)

    with pytest.raises(SystemExit) as done:
        cli.main(["export", str(tmp / "ckpt"), str(tmp / "x"), "--adapters", "--merged"])
    assert done.value.code == 2 and "--adapters and --merged together: choose one" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="holds LoRA adapters only .* Fix: pass --adapters"):
        cli.main(["export", str(tmp / "ckpt"), str(tmp / "x")])
