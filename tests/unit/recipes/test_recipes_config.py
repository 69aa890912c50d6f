"""Every recipe config composes and instantiates; typos and wrong types fail with the key's name."""

from __future__ import annotations

import inspect
import sys
from itertools import product
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from paths import ROOT

from lightning_tp import TensorParallelStrategy
from lightning_tp.models import Llama, list_presets
from lightning_tp.recipes import CONF_DIR, register_configs
from lightning_tp.recipes.run import model_config

CONF = CONF_DIR  # the packaged configs (a clone's top-level conf/ links to them)
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("model", "strategy", "trainer")}
TRAINER_ARGS = set(inspect.signature(L.Trainer.__init__).parameters)

register_configs()


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        return compose(name, overrides=overrides)


def test_every_preset_has_a_model_config():
    assert GROUPS["model"] == sorted(list_presets())


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "records.jsonl"
    path.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    return path


@pytest.mark.parametrize("recipe", ["pretrain", "finetune"])
def test_every_combination_composes_and_instantiates(recipe: str) -> None:
    built_models = {}
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        combos = [(m, s, t, compose(recipe, overrides=[f"model={m}", f"strategy={s}", f"trainer={t}"]))
                  for m, s, t in product(GROUPS["model"], GROUPS["strategy"], GROUPS["trainer"])]
    for model, strategy, trainer, cfg in combos:
        OmegaConf.resolve(cfg)
        assert cfg.model.name == model
        for group, option in (("strategy", strategy), ("trainer", trainer)):  # the option's values were applied
            for key, value in OmegaConf.load(CONF / group / f"{option}.yaml").items():
                assert cfg[group][key] == value, (group, option, key)
        strat = instantiate(cfg.strategy)
        assert isinstance(strat, TensorParallelStrategy)
        assert strat.sequence_parallel == cfg.strategy.sequence_parallel
        assert strat.fsdp == cfg.strategy.fsdp
        trainer_kwargs = {k for k in cfg.trainer if k != "_target_"}
        assert trainer_kwargs <= TRAINER_ARGS, trainer_kwargs - TRAINER_ARGS
        if model not in built_models:  # building is per model, not per combination
            with torch.device("meta"):
                llama = Llama(model_config(cfg.model))
            assert sum(p.numel() for p in llama.parameters()) == llama.config.num_params
            built_models[model] = llama
    assert set(built_models) == set(GROUPS["model"])


def test_cpu_trainer_config_builds_a_trainer_with_the_strategy(tmp_path: Path) -> None:
    cfg = _compose("pretrain", ["trainer=cpu", f"out_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy, tensor_parallel_size=2), logger=False)
    assert isinstance(trainer.strategy, TensorParallelStrategy)
    assert (trainer.strategy._data_parallel_size, trainer.strategy._tensor_parallel_size) == (2, 2)


@pytest.mark.parametrize("data", ["alpaca", "chat"])
def test_finetune_data_groups_take_a_path(data: str, jsonl: Path) -> None:
    cfg = _compose("finetune", [f"data={data}", f"data.path={jsonl}"])
    assert cfg.data.path == str(jsonl) and cfg.data.format == data


@pytest.mark.parametrize(
    ("override", "key"),
    [("trainer.max_stepz=5", "max_stepz"), ("strategy.sequence_paralel=false", "sequence_paralel"),
     ("model.hiden_size=8", "hiden_size"), ("data.seq_lenn=64", "seq_lenn"), ("bogus=1", "bogus")],
)
def test_typo_fails_with_the_key_name(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        _compose("pretrain", [override])
    assert key in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(("override", "key"), [("trainer.max_steps=abc", "max_steps"),
                                               ("strategy.loss_parallel=maybe", "loss_parallel"),
                                               ("data.batch_size=1.5", "batch_size")])
def test_wrong_type_fails_with_the_key_name(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        _compose("pretrain", [override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_unknown_group_option_lists_the_choices() -> None:
    with pytest.raises(ConfigCompositionException, match="llama3_8b"):
        _compose("pretrain", ["model=llama3_9b"])


def test_console_entry_point_passes_hydra_flags_through(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_tp import cli

    cli.main(["pretrain", "--cfg", "job", "model=debug", "trainer.max_steps=7"])
    job = OmegaConf.create(capsys.readouterr().out)
    assert job.model.name == "debug" and job.trainer.max_steps == 7
    with pytest.raises(SystemExit, match="unknown recipe 'pretrian'.*pretrain"):
        cli.main(["pretrian"])


def test_packaged_configs_and_the_clone_link() -> None:
    assert CONF_DIR == Path(__import__("lightning_tp").__file__).resolve().parent / "conf"
    assert (CONF_DIR / "pretrain.yaml").is_file() and (CONF_DIR / "plan.yaml").is_file()
    link = ROOT / "conf"  # the clone's top-level conf/ is the same directory
    assert link.resolve() == CONF_DIR


def test_console_entry_point_relaunches_the_recipe_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`lightning-tp pretrain` runs `lightning_tp.recipes.pretrain` as `python -m` would, so the command Lightning's
    launcher builds for ranks > 0 is `python -m lightning_tp.recipes.pretrain ...` (no file of the clone)."""
    import logging

    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

    import lightning_tp.recipes.run as recipe_run
    from lightning_tp import cli

    seen: dict = {}

    def fake_run(cfg, checkpoint=None):
        import __main__

        seen["main"] = __main__.__spec__.name
        seen["cmd"], seen["cwd"] = _hydra_subprocess_cmd(local_rank=1)

    monkeypatch.setattr(recipe_run, "run", fake_run)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # Hydra leaves its job config set; later tests don't
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    monkeypatch.chdir(tmp_path)
    cli.main(["pretrain", "model=debug", f"out_dir={tmp_path / 'out'}"])
    assert seen["main"] == "lightning_tp.recipes.pretrain"
    assert seen["cmd"][:3] == [sys.executable, "-m", "lightning_tp.recipes.pretrain"]
    assert "model=debug" in seen["cmd"] and seen["cwd"] == str(tmp_path)


def test_help_flag_reaches_hydra(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_tp import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["finetune", "--help"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "== Configuration groups ==" in out and "strategy: tp, tp_nofsdp, tp_sp, tp_sp_lp, tp_sp_lp_nofsdp" in out


@pytest.mark.parametrize(
    ("override", "words"),
    [("trainer.max_stepz=5", ["Unknown key 'trainer.max_stepz'", "did you mean trainer.max_steps"]),
     ("strategy.compile=maybe", ["strategy.compile takes bool", "'maybe'", "Fix"])],
    ids=["typo", "wrong-type"],
)
def test_command_line_typos_are_explained_before_hydra_runs(override: str, words: list[str]) -> None:
    from lightning_tp import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["pretrain", override, "--multirun", "optimizer.lr=1e-3,3e-4"])  # the sweep is left to Hydra
    for word in words:
        assert word in str(info.value.code)
    # a valid line passes the check (and then reaches Hydra, here only to print the config)
    from lightning_tp.recipes import check_overrides

    check_overrides("pretrain", ["pretrain.py", "trainer.max_steps=5", "optimizer.lr=1e-3,3e-4", "+foo=1"])
