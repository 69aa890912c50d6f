"""PretrainDataModule: packing, cache, split, shuffling, data-parallel sharding, resumption and errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from _ci_deps import require
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tp.data.pretrain import (
    DEFAULT_CORPUS_MAX_BYTES,
    DataError,
    PretrainDataModule,
    ResumableDistributedSampler,
    default_corpus_files,
)
from lightning_tp.data.tokenizers import TokenizerError, check_tokenizer
from lightning_tp.errors import LightningTPError

EOS = 257  # ByteTokenizer


def _corpus(tmp_path: Path, n_docs: int = 40, words: int = 30) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(f"w{i}-{j}" for j in range(words)))
    return folder


def _dm(path: object, tmp_path: Path, **kwargs: object) -> PretrainDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = PretrainDataModule(path, **kwargs)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _first_tokens(loader: torch.utils.data.DataLoader) -> list[list[int]]:
    """Each batch as the list of its samples' full windows (hashable enough to compare orders)."""
    return [torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).tolist() for b in loader]


def _windows(dm: PretrainDataModule, dataset: object) -> set[tuple[int, ...]]:
    return {tuple(dataset.window(i).tolist()) for i in range(len(dataset))}  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------- packing


def test_documents_are_packed_with_eos_and_the_partial_window_is_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    for name, text in [("a.txt", "abc"), ("b.txt", "de"), ("c.txt", "fgh"), ("d.txt", "")]:
        (folder / name).write_text(text)
    dm = _dm(str(folder / "*.txt"), tmp_path, seq_len=3, batch_size=1, val_fraction=0.5)
    expected = [*b"abc", EOS, *b"de", EOS, *b"fgh", EOS]  # the empty file adds no document
    token_file, meta_file = dm.cache_paths()
    meta = json.loads(meta_file.read_text())
    assert meta["dtype"] == "uint16" and meta["num_documents"] == 3 and meta["num_tokens"] == len(expected)
    assert np.fromfile(token_file, dtype=np.uint16).tolist() == expected
    # 11 tokens -> two windows of seq_len + 1 = 4, the last 3 tokens dropped
    assert dm.num_train_sequences + dm.num_val_sequences == 2
    assert _windows(dm, dm.train_dataset) | _windows(dm, dm.val_dataset) == {tuple(expected[:4]), tuple(expected[4:8])}


def test_samples_are_windows_with_labels_shifted_by_one(tmp_path: Path) -> None:
    dm = _dm(str(_corpus(tmp_path)), tmp_path, seq_len=16, batch_size=4)
    tokens = np.fromfile(dm.cache_paths()[0], dtype=np.uint16)
    sample = dm.train_dataset[0]
    start = int(dm.train_dataset.window_ids[0]) * 17
    assert sample["input_ids"].dtype == sample["labels"].dtype == torch.int64
    assert sample["input_ids"].tolist() == tokens[start : start + 16].tolist()
    assert sample["labels"].tolist() == tokens[start + 1 : start + 17].tolist()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    # the memory map is not pickled into DataLoader workers
    clone = pickle.loads(pickle.dumps(dm.train_dataset))
    assert clone._tokens is None and torch.equal(clone[3]["labels"], dm.train_dataset[3]["labels"])


def test_train_and_validation_are_disjoint_and_cover_all_windows(tmp_path: Path) -> None:
    dm = _dm(str(_corpus(tmp_path)), tmp_path, seq_len=16, val_fraction=0.1)
    n = dm.num_train_sequences + dm.num_val_sequences
    assert n == dm.num_tokens // 17
    assert dm.num_val_sequences == round(0.1 * n)
    train, val = set(dm.train_dataset.window_ids.tolist()), set(dm.val_dataset.window_ids.tolist())
    assert not train & val and train | val == set(range(n))
    # the split does not depend on the shuffling seed
    other = _dm(str(tmp_path / "corpus"), tmp_path, seq_len=16, val_fraction=0.1, seed=7)
    assert other.val_dataset.window_ids.tolist() == dm.val_dataset.window_ids.tolist()


# ---------------------------------------------------------------------------------------------------- order


def test_training_order_is_seeded_and_reshuffled_per_epoch(tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    a = _dm(str(folder), tmp_path, seq_len=16, batch_size=4, seed=1)
    b = _dm(str(folder), tmp_path, seq_len=16, batch_size=4, seed=1)
    c = _dm(str(folder), tmp_path, seq_len=16, batch_size=4, seed=2)
    order_a, order_b, order_c = (_first_tokens(m.train_dataloader()) for m in (a, b, c))
    assert order_a == order_b
    assert order_a != order_c
    loader = a.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = _first_tokens(loader)
    assert epoch1 != order_a and len(epoch1) == len(order_a)
    assert sorted(loader.sampler) == list(range(a.num_train_sequences))  # every window once per epoch
    # an epoch is seeded with seed + epoch
    assert list(ResumableDistributedSampler(range(50), seed=3)) != list(ResumableDistributedSampler(range(50), seed=4))
    s = ResumableDistributedSampler(range(50), seed=3)
    s.set_epoch(1)
    assert list(s) == list(ResumableDistributedSampler(range(50), seed=4))


def test_data_parallel_ranks_get_disjoint_samples_covering_all(tmp_path: Path) -> None:
    shards = [list(ResumableDistributedSampler(range(11), num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5  # the tail is dropped so that the replicas stay in step
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 10
    even = [set(ResumableDistributedSampler(range(12), num_replicas=2, rank=r)) for r in (0, 1)]
    assert not even[0] & even[1] and even[0] | even[1] == set(range(12))

    # through the data module: the data-parallel size/rank come from trainer.distributed_sampler_kwargs
    folder = _corpus(tmp_path)
    seen = []
    for rank in (0, 1):
        dm = _dm(str(folder), tmp_path, seq_len=16, batch_size=2)
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})  # type: ignore
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, ResumableDistributedSampler)
        seen.append([tuple(w) for batch in _first_tokens(loader) for w in batch])
        val = dm.val_dataloader()
        assert isinstance(val.sampler, torch.utils.data.DistributedSampler) and not val.sampler.shuffle
        assert val.sampler.num_replicas == 2 and val.sampler.rank == rank
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) >= (dm.num_train_sequences // 2 // 2) * 2
    assert set(seen[0]) | set(seen[1]) <= _windows(dm, dm.train_dataset)
    # same data-parallel rank (e.g. two tensor-parallel ranks) -> same samples
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})  # type: ignore
    assert [tuple(w) for batch in _first_tokens(dm.train_dataloader()) for w in batch] == seen[1]


# ---------------------------------------------------------------------------------------------------- resume


def test_sampler_resumes_mid_epoch(tmp_path: Path) -> None:
    sampler = ResumableDistributedSampler(range(40), num_replicas=2, rank=1, seed=9)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    head = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "consumed": 7, "num_replicas": 2}
    resumed = ResumableDistributedSampler(range(40), num_replicas=2, rank=1, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what Lightning calls at the start of the resumed epoch
    assert head + list(resumed) == full
    assert list(resumed) == full  # later iterations of the epoch start at its beginning
    assert len(resumed) == len(full)
    # a state at the end of an epoch continues with the next epoch
    done = ResumableDistributedSampler(range(40), num_replicas=2, rank=1, seed=9)
    done.load_state_dict({"epoch": 2, "consumed": 20, "num_replicas": 2})
    sampler.set_epoch(3)
    assert done.epoch == 3 and list(done) == list(sampler)
    # another data-parallel size maps the position through the global sample count
    with pytest.warns(UserWarning, match="num_replicas"):
        single = ResumableDistributedSampler(range(40), seed=9)
        single.load_state_dict({"epoch": 0, "consumed": 7, "num_replicas": 2})
    assert single.consumed == 14


def test_datamodule_resumes_with_exactly_the_remaining_batches(tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    reference = _dm(str(folder), tmp_path, seq_len=16, batch_size=4, seed=3)
    full = _first_tokens(reference.train_dataloader())
    assert len(full) > 6

    first = _dm(str(folder), tmp_path, seq_len=16, batch_size=4, seed=3)
    it = iter(first.train_dataloader())
    consumed = [torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).tolist() for b in (next(it) for _ in range(5))]
    state = first.state_dict()
    assert state["consumed"] == 20 and state["epoch"] == 0

    second = PretrainDataModule(str(folder), seq_len=16, batch_size=4, seed=3, cache_dir=str(tmp_path / "cache"))
    second.load_state_dict(state)  # Lightning restores the data module before it asks for loaders
    second.setup("fit")
    rest = _first_tokens(second.train_dataloader())
    assert consumed + rest == full


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"][:, :8].flatten().tolist())
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_resume_from_mid_epoch_checkpoint_continues_the_order(tmp_path: Path) -> None:
    folder = _corpus(tmp_path, n_docs=20)
    kwargs = {"seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache")}
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                      "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": str(tmp_path)}
    per_epoch = _dm(str(folder), tmp_path, **kwargs).num_train_sequences // 4
    total = per_epoch + 5  # crosses an epoch boundary after the resume

    full = _Recorder()
    L.Trainer(max_steps=total, **trainer_kwargs).fit(full, PretrainDataModule(str(folder), **kwargs))

    ckpt_dir = tmp_path / "ckpt"
    first = _Recorder()
    callback = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=7, save_top_k=-1)
    L.Trainer(max_steps=7, callbacks=[callback], **trainer_kwargs).fit(first, PretrainDataModule(str(folder), **kwargs))
    ckpt = next(ckpt_dir.glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
    assert saved["epoch"] == 0 and saved["consumed"] == 7 * 4

    second = _Recorder()
    L.Trainer(max_steps=total, **trainer_kwargs).fit(second, PretrainDataModule(str(folder), **kwargs), ckpt_path=ckpt)
    assert len(first.seen) == 7 and first.seen + second.seen == full.seen


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path: Path) -> None:
    folder = _corpus(tmp_path, n_docs=5)
    first = _dm(str(folder), tmp_path, seq_len=8)
    token_file, meta_file = first.cache_paths()
    stamp = (token_file.stat().st_mtime_ns, meta_file.stat().st_mtime_ns)
    assert not [p for p in token_file.parent.iterdir() if ".tmp-" in p.name]

    calls = []
    second = PretrainDataModule(str(folder), seq_len=8, cache_dir=str(tmp_path / "cache"))
    encode = second.tokenizer.encode
    second.tokenizer.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)  # type: ignore[method-assign]
    second.prepare_data()
    second.setup()
    assert calls == [] and second.cache_paths() == (token_file, meta_file)
    assert (token_file.stat().st_mtime_ns, meta_file.stat().st_mtime_ns) == stamp
    assert second.num_tokens == first.num_tokens

    (folder / "doc002.txt").write_text("changed text")
    third = PretrainDataModule(str(folder), seq_len=8, cache_dir=str(tmp_path / "cache"))
    encode3 = third.tokenizer.encode
    third.tokenizer.encode = lambda *a, **k: calls.append(1) or encode3(*a, **k)  # type: ignore[method-assign]
    third.prepare_data()
    third.setup()
    assert len(calls) == 5 and third.cache_paths()[0] != token_file
    assert third.num_tokens != first.num_tokens
    # another max_bytes is another cache
    assert _dm(str(folder), tmp_path, seq_len=8, max_bytes=300).cache_paths()[0] != third.cache_paths()[0]


def test_a_half_written_cache_is_not_used(tmp_path: Path) -> None:
    folder = _corpus(tmp_path, n_docs=5)
    dm = _dm(str(folder), tmp_path, seq_len=8)
    token_file, meta_file = dm.cache_paths()
    with open(token_file, "r+b") as f:  # truncated token file: the metadata's count no longer matches
        f.truncate(10)
    again = _dm(str(folder), tmp_path, seq_len=8)
    assert token_file.stat().st_size == again.num_tokens * 2 and again.num_tokens == dm.num_tokens


def test_large_vocabularies_are_cached_as_uint32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = SimpleNamespace(name="big", vocab_size=70_000, bos_id=None, eos_id=69_999, pad_id=69_999,
                          encode=lambda text, bos=False, eos=False: [66_000 + len(w) for w in text.split()] + [69_999],
                          decode=lambda ids: "")
    monkeypatch.setattr("lightning_tp.data.pretrain.load_tokenizer", lambda spec: big)
    dm = _dm(str(_corpus(tmp_path, n_docs=3, words=10)), tmp_path, tokenizer="big", seq_len=4, batch_size=1)
    assert dm.dtype == "uint32" and json.loads(dm.cache_paths()[1].read_text())["dtype"] == "uint32"
    assert dm.num_tokens == 33 and int(dm.train_dataset[0]["input_ids"].max()) > 65_535


# ---------------------------------------------------------------------------------------------------- paths


def test_paths_globs_directories_and_lists(tmp_path: Path) -> None:
    folder = _corpus(tmp_path, n_docs=4)
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.md").write_text("deep " * 20)
    (folder / ".hidden").write_text("secret " * 20)
    as_dir = PretrainDataModule(str(folder), cache_dir=str(tmp_path / "cache"))
    assert [p.name for p in as_dir.files] == ["doc000.txt", "doc001.txt", "doc002.txt", "doc003.txt", "deep.md"]
    assert [p.name for p in PretrainDataModule(str(folder / "**" / "*.md")).files] == ["deep.md"]
    listed = PretrainDataModule([str(folder / "doc001.txt"), str(folder / "*.txt")])
    assert len(listed.files) == 4  # de-duplicated


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_path_names_the_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(DataError, match="nowhere") as err:
        PretrainDataModule(pattern)
    assert pattern in str(err.value) and isinstance(err.value, LightningTPError)
    with pytest.raises(DataError, match="missing.txt"):
        PretrainDataModule([str(_corpus(tmp_path, n_docs=1)), str(tmp_path / "missing.txt")])


def test_empty_corpus_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        PretrainDataModule(str(tmp_path / "empty.txt"), cache_dir=str(tmp_path / "cache"))


def test_too_short_corpus_says_how_many_tokens_are_needed(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("x" * 100)  # 101 tokens with the EOS
    dm = PretrainDataModule(str(tmp_path / "short.txt"), seq_len=64, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    with pytest.raises(DataError, match=r"101 tokens.*need 130"):
        dm.setup("fit")
    ok = _dm(str(tmp_path / "short.txt"), tmp_path, seq_len=49, batch_size=1)
    assert (ok.num_train_sequences, ok.num_val_sequences) == (1, 1)
    with pytest.raises(DataError, match="batch_size=2"):
        _dm(str(tmp_path / "short.txt"), tmp_path, seq_len=49, batch_size=2).train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seq_len": 0}, "seq_len=0"),
        ({"seq_len": 16.5}, "seq_len=16.5"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"val_fraction": 1.5}, "val_fraction=1.5"),
        ({"num_workers": -2}, "num_workers=-2"),
        ({"max_bytes": 0}, "max_bytes=0"),
    ],
)
def test_bad_values_name_the_parameter_and_the_fix(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(DataError, match="Fix") as err:
        PretrainDataModule(str(_corpus(tmp_path, n_docs=1)), **kwargs)
    assert name in str(err.value)


def test_datasets_need_setup(tmp_path: Path) -> None:
    dm = PretrainDataModule(str(_corpus(tmp_path, n_docs=1)), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="setup"):
        _ = dm.num_train_sequences


# ---------------------------------------------------------------------------------------------------- default corpus


def test_embedded_default_corpus(tmp_path: Path) -> None:
    files = default_corpus_files()
    assert files and all(p.suffix == ".py" for p in files)
    skipped = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(skipped & set(p.parts) for p in files)
    assert files == default_corpus_files()  # deterministic
    described = PretrainDataModule.describe_default_corpus()
    assert described["bytes"] == DEFAULT_CORPUS_MAX_BYTES  # the byte tokenizer gives > 8M tokens by default
    assert PretrainDataModule(cache_dir=str(tmp_path / "cache")).max_bytes == DEFAULT_CORPUS_MAX_BYTES

    dm = _dm(None, tmp_path, seq_len=256, max_bytes=1_100_000)
    assert dm.num_tokens > 1_000_000
    assert dm.num_train_sequences + dm.num_val_sequences == dm.num_tokens // 257
    text = dm.tokenizer.decode(dm.train_dataset[0]["input_ids"].tolist())
    assert text.isprintable() or "\n" in text


# ---------------------------------------------------------------------------------------------------- tokenizer.json


def test_tokenizer_json_end_to_end(tmp_path: Path) -> None:
    tokenizers = require("tokenizers")  # comes with transformers
    words = "the quick brown fox jumps over the lazy dog again and again".split()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    eos = tok.token_to_id("<eos>")

    corpus = tmp_path / "text"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(" ".join(words[i:] + words[:i]))
    dm = _dm(str(corpus), tmp_path, tokenizer=str(tok_dir), seq_len=7, batch_size=2)
    assert dm.tokenizer.eos_id == eos and dm.tokenizer.name.startswith("hf-")
    tokens = np.fromfile(dm.cache_paths()[0], dtype=np.uint16).tolist()
    assert tokens.count(eos) == 6 and tokens[len(words)] == eos  # one EOS after each 11-word document
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 7) and int(batch["input_ids"].max()) < dm.tokenizer.vocab_size
    check_tokenizer(dm.tokenizer, 512)
    with pytest.raises(TokenizerError, match="vocab_size"):
        check_tokenizer(dm.tokenizer, dm.tokenizer.vocab_size - 1)
    # another tokenizer is another cache
    assert _dm(str(corpus), tmp_path, seq_len=7).cache_paths() != dm.cache_paths()
    assert os.path.isfile(dm.cache_paths()[1])


def test_resharding_with_the_same_global_batch_does_not_warn(tmp_path: Path) -> None:
    import warnings

    folder = _corpus(tmp_path)
    saved = {"epoch": 0, "consumed": 8, "num_replicas": 2, "batch_size": 4}  # dp=2 x 4 samples
    for batch_size, should_warn in ((8, False), (4, True)):  # now dp=1: 8 keeps the global batch, 4 halves it
        dm = _dm(str(folder), tmp_path, seq_len=16, batch_size=batch_size, seed=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm.load_state_dict(dict(saved))
            dm.train_dataloader()
        messages = [str(w.message) for w in caught if "global batch" in str(w.message)]
        assert bool(messages) == should_warn, messages
