"""Tests of :mod:`lightning_tp.data.finetune`: masking, packing, validation errors and the default data set."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_tp.data.finetune import (
    PROMPT_TEMPLATES,
    DataError,
    FinetuneDataModule,
    _pack,
    format_prompt,
    make_default_dataset,
)
from lightning_tp.errors import LightningTPError

BOS, EOS, PAD, IGNORE = 256, 257, 258, -100
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PLAIN_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write one line per item: dicts as JSON, strings verbatim (to plant malformed lines)."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _check_row(input_ids: torch.Tensor, labels: torch.Tensor, prompt: list[int], response: list[int]) -> None:
    """The row holds ``prompt + response`` (already with BOS/EOS), labels only on ``response``, then padding."""
    seq = prompt + response
    n = len(seq) - 1
    assert input_ids[:n].tolist() == seq[:-1]
    assert input_ids[n:].eq(PAD).all()
    expected = [IGNORE] * (len(prompt) - 1) + response + [IGNORE] * (len(labels) - n)
    assert labels.tolist() == expected


# ---------------------------------------------------------------------------------------------------- masking


def test_alpaca_prompt_masked_response_labelled_exact_positions(tmp_path: Path) -> None:
    records = [
        {"instruction": "Reverse the word 'cat'.", "output": "tac"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    file = _write_jsonl(tmp_path / "a.jsonl", records)
    dm = FinetuneDataModule(path=str(file), seq_len=256, val_fraction=0.0)
    dm.setup()
    assert dm.num_train == 2 and dm.num_val == 0 and dm.train_indices == [0, 1]
    ids, labels = dm.train_dataset.input_ids, dm.train_dataset.labels
    assert ids.shape == labels.shape == (2, 256) and ids.dtype == labels.dtype == torch.int64

    prompt0 = [BOS] + _bytes(ALPACA_NO_INPUT.format(instruction=records[0]["instruction"]))
    _check_row(ids[0], labels[0], prompt0, _bytes("tac") + [EOS])
    assert format_prompt(records[1]["instruction"], records[1]["input"]).startswith(
        "Below is an instruction that describes a task, paired with an input"
    )
    prompt1 = [BOS] + _bytes(format_prompt(records[1]["instruction"], records[1]["input"]))
    assert _bytes("### Input:\n2 and 3\n\n### Response:\n") == prompt1[-len("### Input:\n2 and 3\n\n### Response:\n"):]
    _check_row(ids[1], labels[1], prompt1, _bytes("5") + [EOS])


def test_plain_template_and_shifted_labels(tmp_path: Path) -> None:
    record = {"instruction": "Uppercase this.", "input": "hello", "output": "HELLO"}
    file = _write_jsonl(tmp_path / "p.jsonl", [record])
    dm = FinetuneDataModule(path=str(file), seq_len=96, val_fraction=0.0, template="plain")
    dm.setup()
    ids, labels = dm.train_dataset.input_ids[0], dm.train_dataset.labels[0]
    prompt = [BOS] + _bytes(PLAIN_WITH_INPUT.format(**record))
    _check_row(ids, labels, prompt, _bytes("HELLO") + [EOS])
    # Shifted: wherever a label is set, it is the next input token (or the final EOS).
    positions = (labels != IGNORE).nonzero().flatten().tolist()
    assert positions == list(range(len(prompt) - 1, len(prompt) + 5))
    for t in positions[:-1]:
        assert labels[t] == ids[t + 1]
    assert labels[positions[-1]] == EOS
    assert format_prompt("Uppercase this.", "hello", template="plain") == PLAIN_WITH_INPUT.format(**record)
    assert format_prompt("x", template="plain") == "### Instruction:\nx\n\n### Response:\n"
    assert set(PROMPT_TEMPLATES) >= {"alpaca", "plain"}


def test_chat_only_assistant_content_and_eos_unmasked(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    file = _write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    dm = FinetuneDataModule(path=str(file), seq_len=128, val_fraction=0.0)
    dm.setup()
    ids, labels = dm.train_dataset.input_ids[0].tolist(), dm.train_dataset.labels[0].tolist()
    seq, target = [BOS], [False]
    for message in messages:
        if message["role"] == "assistant":
            head, body = _bytes("<|assistant|>\n"), _bytes(message["content"]) + [EOS]
            seq += head + body
            target += [False] * len(head) + [True] * len(body)
        else:
            turn = _bytes(f"<|{message['role']}|>\n{message['content']}\n")
            seq += turn
            target += [False] * len(turn)
    n = len(seq) - 1
    assert ids[:n] == seq[:-1] and all(i == PAD for i in ids[n:])
    assert labels == [s if m else IGNORE for s, m in zip(seq[1:], target[1:], strict=True)] + [IGNORE] * (128 - n)
    labelled = [x for x in labels if x != IGNORE]
    assert labelled == _bytes("Hello!") + [EOS] + _bytes("4") + [EOS]


def test_auto_format_per_file_in_a_directory(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    _write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y"}]}])
    dm = FinetuneDataModule(path=str(tmp_path), val_fraction=0.0)
    dm.setup()
    assert dm.num_train == 2
    assert dm.records[0].messages is None and dm.records[1].messages == (("user", "x"), ("assistant", "y"))
    assert dm.records[0].source == f"{tmp_path / 'a.jsonl'}:1"
    # An explicit format that does not match the records is a record error.
    with pytest.raises(DataError, match=r"b\.jsonl:1: missing 'instruction'"):
        FinetuneDataModule(path=str(tmp_path), format="alpaca").setup()


# ---------------------------------------------------------------------------------------------------- padding, packing


def test_padding_to_seq_len_and_batches() -> None:
    dm = FinetuneDataModule(seq_len=224, batch_size=4, template="plain")
    dm.setup()
    assert dm.train_dataset.input_ids.shape == (dm.num_train, 224)
    assert dm.val_dataset.labels.shape == (dm.num_val, 224)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 224)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    # Padding: inputs end with PAD, labels there are ignored.
    pad = dm.train_dataset.input_ids == PAD
    assert pad.any() and dm.train_dataset.labels[pad].eq(IGNORE).all()


def test_packing_is_deterministic_and_uses_fewer_pad_tokens(tmp_path: Path) -> None:
    file = _write_jsonl(tmp_path / "d.jsonl", make_default_dataset(800))
    kwargs: dict[str, Any] = {"path": str(file), "seq_len": 256, "template": "plain", "val_fraction": 0.1}
    padded = FinetuneDataModule(**kwargs)
    packed = FinetuneDataModule(packing=True, **kwargs)
    again = FinetuneDataModule(packing=True, **kwargs)
    for dm in (padded, packed, again):
        dm.setup()
    assert torch.equal(packed.train_dataset.input_ids, again.train_dataset.input_ids)
    assert torch.equal(packed.train_dataset.labels, again.train_dataset.labels)
    assert packed.train_dataset.input_ids.shape[1] == 256
    assert packed.num_train < padded.num_train
    assert packed.num_train_examples == padded.num_train_examples
    assert (packed.train_dataset.input_ids == PAD).sum() < (padded.train_dataset.input_ids == PAD).sum()
    # Same labelled tokens, just rearranged; one EOS target per example.
    for split in ("train_dataset", "val_dataset"):
        a, b = getattr(padded, split).labels, getattr(packed, split).labels
        assert sorted(a[a != IGNORE].tolist()) == sorted(b[b != IGNORE].tolist())
    assert (packed.train_dataset.labels == EOS).sum() == packed.num_train_examples
    # Document boundaries: an EOS input is followed by the next example's BOS, whose label is ignored.
    ids, labels = packed.train_dataset.input_ids, packed.train_dataset.labels
    boundary = (ids[:, 1:] == BOS)
    assert boundary.any() and ids[:, :-1][boundary].eq(EOS).all() and labels[:, :-1][boundary].eq(IGNORE).all()


def test_pack_bins_fit_and_cover_every_item() -> None:
    lengths = torch.randint(2, 60, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    bins = _pack(lengths, 64)
    assert sorted(i for items in bins for i in items) == list(range(500))
    assert all(sum(lengths[i] for i in items) <= 64 for items in bins)
    assert len(bins) < 1.1 * sum(lengths) / 64 + 1  # close to the lower bound
    assert bins == _pack(lengths, 64)


def test_jsonl_line_numbers_with_unicode_line_separators(tmp_path: Path) -> None:
    file = tmp_path / "u.jsonl"
    record = json.dumps({"instruction": "a\u2028b", "output": "c\u0085d"}, ensure_ascii=False)
    file.write_text(f"{record}\n{record}\n{{bad\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"u\.jsonl:3: invalid JSON"):
        FinetuneDataModule(path=str(file)).setup()


# ---------------------------------------------------------------------------------------------------- malformed data


def test_malformed_jsonl_line_reports_file_and_line(tmp_path: Path) -> None:
    good = {"instruction": "a", "output": "b"}
    file = _write_jsonl(tmp_path / "bad.jsonl", [good, "", good, '{"instruction": "x", "output": ', good])
    with pytest.raises(DataError) as err:
        FinetuneDataModule(path=str(file)).setup()
    assert f"{file}:4: invalid JSON" in str(err.value)
    assert isinstance(err.value, LightningTPError) and "skip_malformed=True" in str(err.value)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"instruction": "a"}, "missing 'output'"),
        ({"instruction": "  ", "output": "b"}, "empty 'instruction'"),
        ({"instruction": "a", "output": 3}, "field 'output' must be a string, got a number"),
        ({"instruction": "a", "input": ["x"], "output": "b"}, "field 'input' must be a string, got an array"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0]: unknown role 'bot'"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0]: 'content' must be a string"),
        ({"messages": []}, "'messages' must be a non-empty array"),
        (["not", "an", "object"], "expected a JSON object, got an array"),
    ],
)
def test_malformed_record_reasons(tmp_path: Path, record: Any, reason: str) -> None:
    first = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if isinstance(record, dict) and "instruction" in record:
        first = {"instruction": "q", "output": "a"}
    file = _write_jsonl(tmp_path / "r.jsonl", [first, first, json.dumps(record)])
    with pytest.raises(DataError) as err:
        FinetuneDataModule(path=str(file)).setup()
    assert f"{file}:3: {reason}" in str(err.value)


def test_skip_malformed_counts_and_warns(tmp_path: Path) -> None:
    good = {"instruction": "a", "output": "b"}
    lines = [good, "{oops", {"instruction": "a"}, good, {"instruction": "", "output": "b"}, good, "[1, 2"]
    file = _write_jsonl(tmp_path / "s.jsonl", lines)
    dm = FinetuneDataModule(path=str(file), skip_malformed=True, val_fraction=0.0)
    with pytest.warns(UserWarning, match=r"Skipped 4 malformed record\(s\)") as record:
        dm.setup()
    message = str(record[0].message)
    assert f"{file}:2: invalid JSON" in message and f"{file}:3: missing 'output'" in message
    assert dm.num_skipped == 4 and len(dm.skipped_reasons) == 4
    assert dm.num_train == 3 and [r.source for r in dm.records] == [f"{file}:{i}" for i in (1, 4, 6)]


def test_json_array_file_reports_record_index(tmp_path: Path) -> None:
    file = tmp_path / "data.json"
    file.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "c"}], indent=2))
    with pytest.raises(DataError, match=r"data\.json: record 2 of the JSON array: missing 'output'"):
        FinetuneDataModule(path=str(file)).setup()
    file.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3))
    dm = FinetuneDataModule(path=str(file), val_fraction=0.0)
    dm.setup()
    assert dm.num_train == 3 and dm.records[1].source.endswith("data.json: record 1 of the JSON array")
    # A single JSON object is not a data set.
    file.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}))
    with pytest.raises(DataError, match="single JSON object"):
        FinetuneDataModule(path=str(file)).setup()
    # A broken JSON array is a file-level error with the line of the problem.
    file.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": \n]')
    with pytest.raises(DataError, match=r"data\.json:4: invalid JSON"):
        FinetuneDataModule(path=str(file), skip_malformed=True).setup()


def test_undetectable_format(tmp_path: Path) -> None:
    file = _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot detect the data format .*format='alpaca'"):
        FinetuneDataModule(path=str(file)).setup()


# ---------------------------------------------------------------------------------------------------- truncation


def test_truncation_counted_and_fully_truncated_response_dropped(tmp_path: Path) -> None:
    records = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "long answer", "output": "x" * 100},
        {"instruction": "y" * 100, "output": "never seen"},
    ]
    file = _write_jsonl(tmp_path / "t.jsonl", records)
    dm = FinetuneDataModule(path=str(file), seq_len=64, template="plain", val_fraction=0.0)
    with pytest.warns(UserWarning, match="2 of 3 examples were longer"):
        dm.setup()
    assert dm.num_truncated == 2 and dm.num_dropped == 1
    assert dm.train_indices == [0, 1] and dm.num_train == 2
    ids, labels = dm.train_dataset.input_ids[1], dm.train_dataset.labels[1]
    prompt = [BOS] + _bytes("### Instruction:\nlong answer\n\n### Response:\n")
    full = prompt + _bytes("x" * 100) + [EOS]
    assert ids.tolist() == full[:64]  # no padding: the row is full
    assert labels.tolist() == [IGNORE] * (len(prompt) - 1) + full[len(prompt):65]
    assert EOS not in labels.tolist()


# ------------------------------------------------------------------------------------------------ default set, split


def test_default_dataset_offline_deterministic_and_learnable(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the default data set must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    first, second = FinetuneDataModule(), FinetuneDataModule()
    first.setup()
    second.setup()
    assert first.num_train + first.num_val == len(first.records) >= 2000
    assert first.num_truncated == 0 and first.num_skipped == 0 and first.num_dropped == 0
    for split in ("train_dataset", "val_dataset"):
        a, b = getattr(first, split), getattr(second, split)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert (a.labels != IGNORE).sum(dim=1).min() >= 2  # at least one answer token and EOS per example
    assert make_default_dataset() == make_default_dataset()
    records = make_default_dataset()
    assert len({r["instruction"] for r in records}) == len(records)
    assert max(len(r["output"]) for r in records) <= 40
    reverse = next(r for r in records if r["instruction"].startswith("Reverse the word: "))
    word = reverse["instruction"].removeprefix("Reverse the word: ")
    assert reverse["output"] == word[::-1]


def test_default_dataset_as_chat_and_too_short_seq_len() -> None:
    dm = FinetuneDataModule(format="chat", seq_len=96)
    dm.setup()
    assert dm.records[0].messages is not None and [role for role, _ in dm.records[0].messages] == ["user", "assistant"]
    ids, labels = dm.train_dataset.input_ids[0].tolist(), dm.train_dataset.labels[0].tolist()
    record = dm.records[dm.train_indices[0]]
    (_, question), (_, answer) = record.messages
    prompt = [BOS] + _bytes(f"<|user|>\n{question}\n<|assistant|>\n")
    _check_row(torch.tensor(ids), torch.tensor(labels), prompt, _bytes(answer) + [EOS])
    # The Alpaca preamble alone is longer than 64 bytes: nothing fits, and the error says what to do.
    with pytest.raises(DataError, match=r"seq_len=64: 3000 dropped .*template='plain'"), pytest.warns(UserWarning):
        FinetuneDataModule(seq_len=64).setup()


def test_train_val_split_disjoint_and_seeded() -> None:
    dm = FinetuneDataModule(val_fraction=0.2, seed=3, template="plain", seq_len=128)
    dm.setup()
    train, val = set(dm.train_indices), set(dm.val_indices)
    assert not train & val and len(train | val) == len(dm.records)
    assert abs(len(val) - 0.2 * len(dm.records)) <= 1
    train_rows = {tuple(r) for r in dm.train_dataset.input_ids.tolist()}
    val_rows = {tuple(r) for r in dm.val_dataset.input_ids.tolist()}
    assert not train_rows & val_rows
    other = FinetuneDataModule(val_fraction=0.2, seed=4, template="plain", seq_len=128)
    other.setup()
    assert other.val_indices != dm.val_indices


# ---------------------------------------------------------------------------------------------------- loaders


def test_dataloaders_use_distributed_sampler_from_trainer(tmp_path: Path) -> None:
    file = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    dm = FinetuneDataModule(path=str(file), seq_len=64, batch_size=3, val_fraction=0.2, seed=7, template="plain")
    loader = dm.train_dataloader()  # builds on demand
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 1
    order = [b["input_ids"] for b in loader]
    again = [b["input_ids"] for b in dm.train_dataloader()]
    assert len(order) == len(again) and all(torch.equal(x, y) for x, y in zip(order, again, strict=True))
    assert sorted(loader.sampler) == list(range(dm.num_train)) != list(loader.sampler)  # shuffled

    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})  # type: ignore[assignment]
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (train.sampler.num_replicas, train.sampler.rank, train.sampler.shuffle) == (2, 1, True)
    assert train.sampler.drop_last and train.sampler.seed == 7
    assert (val.sampler.num_replicas, val.sampler.rank, val.sampler.shuffle) == (2, 1, False)
    assert len(train.sampler) == dm.num_train // 2 and len(val.sampler) == 2
    assert len(train) == len(train.sampler) // 3 == 2 and all(len(b["input_ids"]) == 3 for b in train)


# ---------------------------------------------------------------------------------------------------- errors


def test_hf_dataset_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    dm = FinetuneDataModule(hf_dataset="tatsu-lab/alpaca")
    with pytest.raises(DataError, match="pip install datasets"):
        dm.setup()
    with pytest.raises(DataError, match="pip install datasets"):
        dm.prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "seq_len=0"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
        ({"val_fraction": 1.0}, r"val_fraction=1\.0"),
        ({"format": "csv"}, "format='csv'"),
        ({"template": "vicuna"}, "template='vicuna'.*alpaca"),
        ({"ignore_index": 5}, "ignore_index=5"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"path": "/nonexistent/data.jsonl"}, "path='/nonexistent/data.jsonl'"),
        ({"path": "x.jsonl", "hf_dataset": "y"}, "only one"),
    ],
)
def test_parameter_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        FinetuneDataModule(**kwargs)


def test_data_error_is_shared_with_pretrain() -> None:
    from lightning_tp.data import pretrain

    assert DataError is pretrain.DataError and issubclass(DataError, LightningTPError)


def test_tokenizer_exposed() -> None:
    dm = FinetuneDataModule()
    assert dm.tokenizer.name == "byte" and dm.tokenizer.eos_id == EOS
    assert dm.hparams["seq_len"] == 256
