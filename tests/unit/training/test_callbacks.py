"""Tests of :mod:`lightning_tp.training.callbacks`: throughput arithmetic, MFU, and the hook logic with a fake clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tp.models import Llama, get_config
from lightning_tp.training import callbacks
from lightning_tp.training.callbacks import ThroughputMonitor, data_parallel_size, mfu, peak_flops_for, tokens_per_step
from lightning_tp.training.module import CausalLMModule


class FakeMesh:
    """A (dp, tp) mesh exposing what the callback reads."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, dp: int, tp: int) -> None:
        self.sizes = {"data_parallel": dp, "tensor_parallel": tp}

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.sizes[name])


class FakeModule:
    def __init__(self, config: Any = None) -> None:
        self.model = SimpleNamespace(config=config) if config is not None else None
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs: Any) -> None:
        self.logged[name] = value


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fake_trainer(dp: int = 2, tp: int = 2) -> SimpleNamespace:
    strategy = SimpleNamespace(device_mesh=FakeMesh(dp, tp), root_device=torch.device("cpu"))
    return SimpleNamespace(strategy=strategy, world_size=dp * tp, global_step=0, precision="bf16-mixed")


def test_tokens_per_step_counts_data_parallel_replicas_only() -> None:
    assert tokens_per_step(4 * 128, 2, 2) == 4 * 128 * 2 * 2
    trainer = _fake_trainer(dp=2, tp=2)
    assert data_parallel_size(trainer) == 2  # not the world size 4
    # Without a mesh every rank is a data-parallel replica.
    assert data_parallel_size(SimpleNamespace(strategy=SimpleNamespace(), world_size=3)) == 3

    class NotSetUp:  # ModelParallelStrategy raises before its processes exist
        @property
        def device_mesh(self) -> Any:
            raise RuntimeError("not yet")

    assert data_parallel_size(SimpleNamespace(strategy=NotSetUp(), world_size=5)) == 5
    with pytest.raises(ValueError):
        tokens_per_step(10, 1, 0)


def test_mfu_matches_hand_computation() -> None:
    # 4 GPUs at 1e15 FLOP/s peak each; 20k tokens/s at 6e10 FLOPs/token is 1.2e15 FLOP/s achieved -> 30 %.
    assert mfu(20_000.0, 6e10, 4, 1e15) == pytest.approx(0.3)
    assert mfu(1.0, 1.0, 1, 2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0, 1.0)


def test_peak_flops_table_lookup() -> None:
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe", "bf16-true") == 756e12
    assert peak_flops_for("NVIDIA H200", "16-mixed") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312e12
    assert peak_flops_for("NVIDIA L4", "bf16-mixed") == 121e12
    assert peak_flops_for("NVIDIA L40S", "bf16-mixed") != 121e12  # "L4" must not shadow "L40S"
    assert peak_flops_for("Some CPU", "bf16-mixed") is None
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "64-true") is None
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops_for("NVIDIA A100 80GB PCIe", "32-true") == 19.5e12
        torch.set_float32_matmul_precision("high")
        assert peak_flops_for("NVIDIA A100 80GB PCIe", "32-true") == 156e12
    finally:
        torch.set_float32_matmul_precision(previous)


def _run_step(cb: ThroughputMonitor, trainer: SimpleNamespace, module: FakeModule, clock: FakeClock,
              batch: dict[str, torch.Tensor], accumulate: int, seconds_per_micro_batch: float) -> None:
    for i in range(accumulate):
        cb.on_train_batch_start(trainer, module, batch, i)
        clock.now += seconds_per_micro_batch
        if i == accumulate - 1:
            trainer.global_step += 1  # the optimizer stepped after the last micro-batch
        cb.on_train_batch_end(trainer, module, None, batch, i)
        clock.now += 5.0  # time between batches (data loading) is not part of the step


def test_monitor_logs_dp_tokens_with_accumulation(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(callbacks, "perf_counter", clock)
    trainer = _fake_trainer(dp=2, tp=2)
    config = get_config("debug")
    module = FakeModule(config)
    bs, seqlen, accumulate = 4, 32, 3
    batch = {"input_ids": torch.zeros(bs, seqlen, dtype=torch.long), "labels": torch.zeros(bs, seqlen)}
    cb = ThroughputMonitor(peak_flops_per_device=1e12, warmup_steps=1)
    cb.on_train_start(trainer, module)

    _run_step(cb, trainer, module, clock, batch, accumulate, 0.5)
    assert module.logged == {}  # warm-up step not logged

    _run_step(cb, trainer, module, clock, batch, accumulate, 0.5)
    step_time = accumulate * 0.5 + (accumulate - 1) * 5.0  # first start .. last end
    tokens = bs * seqlen * accumulate * 2  # dp = 2 replicas; the 2 tp ranks share each replica's batch
    assert module.logged["perf/step_time"] == pytest.approx(step_time)
    assert module.logged["perf/tokens_per_sec"] == pytest.approx(tokens / step_time)
    assert module.logged["perf/tokens_per_sec"] != pytest.approx(2 * tokens / step_time)  # not dp*tp = 4
    assert module.logged["perf/tokens_per_sec_per_device"] == pytest.approx(tokens / step_time / 4)
    expected_mfu = (tokens / step_time) * config.flops_per_token(seqlen) / (4 * 1e12)
    assert module.logged["perf/mfu"] == pytest.approx(expected_mfu)


def test_monitor_explicit_flops_and_no_mfu_without_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(callbacks, "perf_counter", clock)
    trainer = _fake_trainer(dp=1, tp=2)
    batch = (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))

    module = FakeModule()  # no model config: FLOPs/token must come from the argument
    cb = ThroughputMonitor(peak_flops_per_device=2e9, flops_per_token=1e6, warmup_steps=0)
    _run_step(cb, trainer, module, clock, batch, 1, 2.0)
    assert module.logged["perf/tokens_per_sec"] == pytest.approx(16 / 2.0)
    assert module.logged["perf/mfu"] == pytest.approx(8.0 * 1e6 / (2 * 2e9))

    module = FakeModule(get_config("debug"))
    cb = ThroughputMonitor(warmup_steps=0)  # CPU, no peak figure -> no MFU
    _run_step(cb, trainer, module, clock, batch, 1, 2.0)
    assert "perf/tokens_per_sec" in module.logged and "perf/mfu" not in module.logged


def test_monitor_in_a_real_trainer() -> None:
    config = get_config("debug")
    llama = Llama(config)
    llama.init_weights(seed=0)
    module = CausalLMModule(llama=llama, warmup_steps=1)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (2, 16), generator=g),
                "labels": torch.randint(0, config.vocab_size, (2, 16), generator=g)} for _ in range(8)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ThroughputMonitor(peak_flops_per_device=1e12, warmup_steps=2)])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    metrics = trainer.callback_metrics
    assert trainer.global_step == 4
    tps = metrics["perf/tokens_per_sec"].item()
    step_time = metrics["perf/step_time"].item()
    assert tps > 0 and tps * step_time == pytest.approx(2 * 2 * 16, rel=1e-4)  # 2 micro-batches of 2x16 tokens
    assert metrics["perf/mfu"].item() == pytest.approx(tps * config.flops_per_token(16) / 1e12, rel=1e-4)
