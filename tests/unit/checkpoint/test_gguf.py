"""``lightning_tp.checkpoint.gguf`` without a GGUF model: how a source is found, and what is refused before any
file is read. The conversion of the real SmolLM2 file is ``tests/multiprocess/test_real_model.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_tp.checkpoint import gguf
from lightning_tp.errors import CheckpointError


def test_a_file_a_directory_and_a_package_name_find_the_same_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "my_models"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    file = package / "tiny.Q4_1.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert gguf.find_gguf(file) == file
    assert gguf.find_gguf(package) == file
    assert gguf.find_gguf("my_models") == file  # found by its spec; its __init__ would raise


@pytest.mark.parametrize("files, fragment", [([], "with 0 .gguf files (none)"),
                                             (["a.gguf", "b.gguf"], "with 2 .gguf files (a.gguf, b.gguf)")])
def test_a_directory_must_hold_exactly_one_file(tmp_path: Path, files: list[str], fragment: str) -> None:
    for name in files:
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        gguf.find_gguf(tmp_path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is not a .gguf file"):
        gguf.find_gguf(tmp_path / "model.safetensors")


def test_missing_readers_are_named_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"needs gguf\. Fix: `pip install gguf`"):
        gguf.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        gguf.convert_gguf(tmp_path / "m.gguf", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
