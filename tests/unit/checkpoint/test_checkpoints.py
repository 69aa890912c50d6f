"""Checkpoints of ``TensorParallelStrategy`` without a process group: the crash-safe swap of a save and its
recovery, incomplete directories, deletion, consolidation of a sharded save into Lightning's single-file format, and
the safe reading of ``.metadata``. The launches (exact resume, resharding, consolidation of a trained run, failures
injected into saves) are ``tests/multiprocess/test_checkpoint_launches.py``.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lightning_tp.checkpoint.consolidate import (
    SafeFileSystemReader,
    check_checkpoint,
    consolidate,
    is_complete,
    publish,
    recover,
    rekey_to_param_ids,
    remove,
)
from lightning_tp.errors import CheckpointError


def _fake_checkpoint(path: Path, tag: str) -> Path:
    """The files of a sharded save; ``meta.pt`` carries the strategy's layout entry, as the strategy writes it."""
    path.mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp"):
        (path / name).write_text(tag)
    torch.save({"lightning_tp": {"format": 1}, "tag": tag}, path / "meta.pt")
    return path


def _tag(path: Path) -> str:
    return torch.load(path / "meta.pt", weights_only=True)["tag"]


def test_publish_swaps_and_recover_undoes_an_interrupted_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    last = _fake_checkpoint(tmp_path / "last", "old")
    staged = _fake_checkpoint(tmp_path / "last.tmp-7", "new")
    publish(staged, last)
    assert _tag(last) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    # a crash between the two renames: `last` gone, the previous complete checkpoint at last.old
    staged = _fake_checkpoint(tmp_path / "last.tmp-8", "newer")
    real_replace = os.replace

    def crash_on_second(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith("last.tmp"):
            raise OSError("injected crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="injected"):
        publish(staged, last)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not last.exists() and is_complete(tmp_path / "last.old")
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint(last)
    recover(last)  # what save and load do first, on rank 0
    assert _tag(last) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # staging leftovers removed too


def test_incomplete_directories_are_refused(tmp_path: Path) -> None:
    shards_only = tmp_path / "shards_only"
    shards_only.mkdir()
    (shards_only / ".metadata").write_text("x")
    with pytest.raises(CheckpointError, match=r"shards_only.*incomplete.*no meta\.pt"):
        check_checkpoint(shards_only)
    with pytest.raises(CheckpointError, match="incomplete"):
        consolidate(shards_only, tmp_path / "out.ckpt")
    assert not is_complete(shards_only)


def test_remove_makes_a_directory_incomplete_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fake_checkpoint(tmp_path / "step-3", "x")
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a crash during the deletion
    remove(path)
    assert path.exists() and not is_complete(path)


def _dcp_checkpoint(path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A sharded-format checkpoint of a plain single-process model, written like the strategy does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from lightning_tp import CausalLMModule

    module = CausalLMModule("debug", init_seed=0, max_steps=6)
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    module.compute_loss({"input_ids": x[:, :-1], "labels": x[:, 1:]})[0].backward()
    optimizer.step()
    dcp.save({"state_dict": get_model_state_dict(module), "optimizer_0": get_optimizer_state_dict(module, optimizer)},
             checkpoint_id=str(path), no_dist=True)
    names = [n for n, _ in module.named_parameters()]
    torch.save({"global_step": 1, "epoch": 0, "lightning_tp": {"parameter_names": names}}, path / "meta.pt")
    return module, optimizer


def test_optimizer_state_is_rekeyed_like_fsdp_rekey_optim_state_dict(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    module, optimizer = _dcp_checkpoint(tmp_path / "ckpt")
    full = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))
    expected = FSDP.rekey_optim_state_dict(full, OptimStateKeyType.PARAM_ID, module)
    ours = torch.load(consolidate(tmp_path / "ckpt", tmp_path / "one.ckpt"), weights_only=True)
    (state,) = ours["optimizer_states"]
    assert list(state["state"]) == list(expected["state"]) and state["param_groups"] == expected["param_groups"]
    for pid, entry in expected["state"].items():
        for k, v in entry.items():
            assert torch.equal(state["state"][pid][k], v)
    assert ours["global_step"] == 1 and ours["state_dict"].keys() == module.state_dict().keys()
    # without the recorded parameter order the names stay (Lightning's loader accepts name-keyed states too)
    with pytest.warns(UserWarning, match="parameter order"):
        kept = rekey_to_param_ids(full, None)
    assert list(kept["state"]) == list(full["state"])


def test_metadata_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    _dcp_checkpoint(tmp_path / "ckpt")
    assert SafeFileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata  # DCP's own classes pass

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    buffer = io.BytesIO()
    pickle.dump(Exploit(), buffer)
    (tmp_path / "ckpt" / ".metadata").write_bytes(buffer.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="Refusing"):
        SafeFileSystemReader(str(tmp_path / "ckpt")).read_metadata()
    with pytest.raises(CheckpointError, match="could not read"):
        consolidate(tmp_path / "ckpt", tmp_path / "out.ckpt")


def test_cli_consolidate_reports_a_bad_directory(tmp_path: Path) -> None:
    from lightning_tp import cli

    with pytest.raises(SystemExit, match="lightning-tp consolidate: .*does not exist"):
        cli.main(["consolidate", str(tmp_path / "nope"), str(tmp_path / "out.ckpt")])
