"""Single-process tests of :class:`lightning_tp.training.module.CausalLMModule`."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_tp.models import Llama, LlamaConfig, get_config
from lightning_tp.training.module import CausalLMModule, TokenMeanLoss, _foreach_is_safe, warmup_cosine_factor

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2)


def _llama(config: LlamaConfig = TINY, seed: int = 0) -> Llama:
    model = Llama(config)
    model.init_weights(seed=seed)
    return model


def _manual_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    mask = labels != ignore_index
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def _batch(vocab: int, bs: int = 3, seqlen: int = 10, seed: int = 0, ignore_index: int = -100):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (bs, seqlen), generator=g)
    labels = torch.randint(0, vocab, (bs, seqlen), generator=g)
    labels[0, :4] = ignore_index
    labels[-1, -3:] = ignore_index
    return {"input_ids": input_ids, "labels": labels}


def test_loss_matches_manual_log_softmax_gather() -> None:
    module = CausalLMModule(llama=_llama())
    batch = _batch(TINY.vocab_size)
    loss, n_tokens = module.compute_loss(batch)
    with torch.no_grad():
        expected = _manual_loss(module(batch["input_ids"]), batch["labels"])
    assert n_tokens.item() == 3 * 10 - 4 - 3
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The tuple batch format gives the same loss.
    loss_tuple, _ = module.compute_loss((batch["input_ids"], batch["labels"]))
    torch.testing.assert_close(loss_tuple, loss)


def test_ignored_positions_do_not_contribute() -> None:
    module = CausalLMModule(llama=_llama(), ignore_index=-1)
    batch = _batch(TINY.vocab_size, ignore_index=-1)
    labels = batch["labels"]
    loss, _ = module.compute_loss(batch)
    with torch.no_grad():
        logits = module(batch["input_ids"]).float()
    keep = labels != -1
    # Mean over the kept positions only ...
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # ... and the masked positions matter if they are given real targets (so the mask is what removed them).
    unmasked = labels.clone()
    unmasked[~keep] = 5
    loss_unmasked, n_unmasked = module.compute_loss({"input_ids": batch["input_ids"], "labels": unmasked})
    assert n_unmasked.item() == labels.numel()
    assert not torch.isclose(loss_unmasked, loss)


def test_loss_is_differentiable_and_reaches_all_parameters() -> None:
    module = CausalLMModule(llama=_llama())
    loss, _ = module.compute_loss(_batch(TINY.vocab_size))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_lr_schedule_shape() -> None:
    lr, warmup, max_steps, ratio = 1e-3, 4, 20, 0.1
    module = CausalLMModule(llama=_llama(), lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=ratio)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(26):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Linear warm-up that starts above zero and peaks exactly at `warmup`.
    for s in range(warmup + 1):
        assert lrs[s] == pytest.approx(lr * (s + 1) / (warmup + 1))
    assert max(lrs) == pytest.approx(lr) and lrs.index(max(lrs)) == warmup
    # Cosine: monotone decrease, half-way value, minimum at max_steps, flat afterwards.
    decay = lrs[warmup:max_steps + 1]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert lrs[(warmup + max_steps) // 2] == pytest.approx(lr * (ratio + (1 - ratio) * 0.5))
    assert lrs[warmup + 4] == pytest.approx(lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * 4 / 16))))
    assert lrs[max_steps] == pytest.approx(lr * ratio)
    assert lrs[max_steps:] == pytest.approx([lr * ratio] * (26 - max_steps))
    # Both parameter groups follow the same schedule.
    assert optimizer.param_groups[1]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_schedule_without_warmup_and_degenerate_lengths() -> None:
    assert warmup_cosine_factor(0, 0, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 0, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(5, 5, 5, 0.2) == pytest.approx(1.0)
    assert warmup_cosine_factor(6, 5, 5, 0.2) == pytest.approx(0.2)


def test_max_steps_from_trainer_when_not_given() -> None:
    module = CausalLMModule(llama=_llama(), warmup_steps=0, min_lr_ratio=0.0)
    module.trainer = SimpleNamespace(max_steps=8, estimated_stepping_batches=1000)  # type: ignore[assignment]
    assert module._resolve_max_steps() == 8
    module.trainer = SimpleNamespace(max_steps=-1, estimated_stepping_batches=12)  # type: ignore[assignment]
    assert module._resolve_max_steps() == 12


def test_no_weight_decay_on_norms() -> None:
    module = CausalLMModule(llama=_llama(), weight_decay=0.1, max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    by_id = {id(p): name for name, p in module.named_parameters()}
    decayed = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    norm_names = {n for n in by_id.values() if "norm" in n}
    assert norm_names and norm_names <= not_decayed
    assert not_decayed == norm_names  # nothing but norms is exempt
    assert {"model.model.embed_tokens.weight", "model.lm_head.weight", "model.model.layers.0.mlp.up_proj.weight",
            "model.model.layers.0.self_attn.q_proj.weight"} <= decayed
    assert decayed | not_decayed == set(by_id.values()) and not decayed & not_decayed
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups if g["weight_decay"] > 0)
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_tied_embeddings_counted_once() -> None:
    module = CausalLMModule(llama=_llama(TINY.replace(tie_word_embeddings=True)))
    module.hparams["max_steps"] = 10
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(module.parameters()))


def test_configure_model_builds_on_meta_with_mesh_and_keeps_given_model() -> None:
    given = _llama()
    module = CausalLMModule(llama=given)
    module.configure_model()
    assert module.model is given

    meshed = CausalLMModule("debug")
    meshed._device_mesh = SimpleNamespace(mesh_dim_names=("data_parallel", "tensor_parallel"))  # type: ignore
    meshed.configure_model()
    assert isinstance(meshed.model, Llama)
    assert all(p.is_meta for p in meshed.model.parameters())
    assert meshed.model.config == get_config("debug")
    built = meshed.model
    meshed.configure_model()  # idempotent
    assert meshed.model is built

    # Without a mesh nobody would materialise a meta model: built for real and initialised from init_seed.
    a, b = CausalLMModule("debug", init_seed=3), CausalLMModule("debug", init_seed=3)
    a.configure_model()
    b.configure_model()
    assert not any(p.is_meta for p in a.parameters())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_hparams_are_plain_data_and_rebuild_the_config() -> None:
    config = TINY.replace(num_hidden_layers=2)
    module = CausalLMModule(config, lr=1e-3)
    assert isinstance(module.hparams["model"], dict)
    rebuilt = CausalLMModule(**module.hparams)
    assert rebuilt.config == config and rebuilt.hparams["lr"] == 1e-3
    assert CausalLMModule("debug").hparams["model"] == "debug"
    # With an explicit network, its config is what gets recorded.
    assert CausalLMModule("small", llama=_llama()).hparams["model"]["hidden_size"] == TINY.hidden_size


def test_token_mean_loss_is_token_weighted() -> None:
    metric = TokenMeanLoss()
    metric.update(torch.tensor(1.0), 30)
    metric.update(torch.tensor(4.0), 10)
    out = metric.compute()
    assert out["loss"].item() == pytest.approx((1.0 * 30 + 4.0 * 10) / 40)  # not the batch mean 2.5
    assert out["tokens"].item() == 40


def test_data_parallel_group_from_mesh() -> None:
    module = CausalLMModule(llama=_llama())
    assert module.data_parallel_group() is None
    sentinel = object()

    class FakeMesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str) -> SimpleNamespace:
            assert name == "data_parallel"
            return SimpleNamespace(get_group=lambda: sentinel)

    module._device_mesh = FakeMesh()  # type: ignore[assignment]
    assert module.data_parallel_group() is sentinel
    assert module._log_kwargs() == {"sync_dist": True, "sync_dist_group": sentinel}


class _FixedBatches(Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


def _loader(batches: list[dict[str, torch.Tensor]]) -> DataLoader:
    return DataLoader(_FixedBatches(batches), batch_size=None, shuffle=False)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_trainer_fit_three_steps_logs_train_and_val_metrics() -> None:
    config = get_config("debug")
    llama = _llama(config, seed=1)
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    module = CausalLMModule(llama=llama, lr=1e-3, warmup_steps=1)
    train = [_batch(config.vocab_size, bs=2, seqlen=16, seed=i) for i in range(3)]
    val = [_batch(config.vocab_size, bs=2, seqlen=16, seed=10 + i) for i in range(2)]
    last_step_loss: list[float] = []

    class LastStepLoss(L.Callback):
        """The loss of the third batch on the weights it is trained from, computed in float64 outside the module."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 2:
                with torch.no_grad():
                    last_step_loss.append(_manual_loss(llama(batch["input_ids"]), batch["labels"]).item())

    trainer = _trainer(max_steps=3, limit_val_batches=2, num_sanity_val_steps=0, callbacks=[LastStepLoss()])
    trainer.fit(module, _loader(train), _loader(val))

    assert trainer.global_step == 3
    assert module.model is llama
    assert any(not torch.equal(before[n], p) for n, p in llama.named_parameters())
    metrics = trainer.callback_metrics
    train_loss = metrics["train/loss"].item()
    # An initialised model starts near the uniform-prediction loss; the logged value is the last step's loss.
    assert abs(train_loss - math.log(config.vocab_size)) < 0.5
    assert train_loss == pytest.approx(last_step_loss[0], rel=1e-5)
    assert metrics["train/ppl"].item() == pytest.approx(math.exp(train_loss), rel=1e-5)
    # Token counts are known exactly: 2 × 16 labels per batch, 4 + 3 of them masked.
    assert metrics["train/tokens"].item() == 2 * 16 - (4 + 3) == int((train[-1]["labels"] != -100).sum())
    assert metrics["train/tokens_seen"].item() == 3 * (2 * 16 - (4 + 3))
    # Validation ran once, after the third step, on the trained weights: its loss is the token-weighted mean over
    # both batches, computed here with a float64 log-softmax on those weights (not from the module's own metric).
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed == 2
    with torch.no_grad():
        sums = [(_manual_loss(llama(b["input_ids"]), b["labels"]) * (b["labels"] != -100).sum(),
                 int((b["labels"] != -100).sum())) for b in val]
    expected_val = sum(s.item() for s, _ in sums) / sum(n for _, n in sums)
    assert sum(n for _, n in sums) == 2 * 2 * 16 - 2 * (4 + 3)  # each batch masks 4 + 3 labels (see _batch)
    assert metrics["val/loss"].item() == pytest.approx(expected_val, rel=1e-5)
    assert metrics["val/ppl"].item() == pytest.approx(math.exp(expected_val), rel=1e-5)


def test_validation_loss_is_token_weighted_over_batches() -> None:
    config = TINY
    module = CausalLMModule(llama=_llama(config))
    batches = [_batch(config.vocab_size, bs=2, seqlen=12, seed=20), _batch(config.vocab_size, bs=2, seqlen=12, seed=21)]
    batches[1]["labels"][:, :9] = -100  # far fewer tokens in the second batch
    with torch.no_grad():
        losses = [module.compute_loss(b) for b in batches]
    n = [int(c) for _, c in losses]
    expected = sum(loss.item() * c for (loss, _), c in zip(losses, n, strict=True)) / sum(n)
    plain_mean = sum(loss.item() for loss, _ in losses) / 2
    assert abs(expected - plain_mean) > 1e-3  # the weighting is observable

    trainer = _trainer()
    results = trainer.validate(module, _loader(batches), verbose=False)
    assert results[0]["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert results[0]["val/tokens"] == sum(n)
    # The metric state is reset between epochs: a second run gives the same value.
    assert trainer.validate(module, _loader(batches), verbose=False)[0]["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_metrics_sync_over_a_real_data_parallel_group() -> None:
    """With a real (1 x 1) device mesh the metric uses the mesh's data-parallel group and syncs through it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        module = CausalLMModule(llama=_llama())
        module._device_mesh = mesh
        metric = module._loss_metric("train_loss", torch.device("cpu"), sync_on_step=True)
        assert metric.process_group is mesh["data_parallel"].get_group()
        stats = metric(torch.tensor(2.0), torch.tensor(7))
        assert stats["loss"].item() == pytest.approx(2.0) and stats["tokens"].item() == 7
        loss, _ = module.compute_loss(_batch(TINY.vocab_size))
        assert torch.isfinite(loss)

        # foreach kernels reject plain tensors mixed with DTensors; the optimizer must then use foreach=False.
        tp = mesh["tensor_parallel"]
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), tp, [Shard(0)]))
        replicated = torch.nn.Parameter(distribute_tensor(torch.randn(4), tp, [Replicate()]))
        plain = torch.nn.Parameter(torch.randn(4))
        assert _foreach_is_safe([sharded, replicated]) and _foreach_is_safe([plain])
        assert not _foreach_is_safe([sharded, plain])
        for p in (sharded, plain):
            p.grad = torch.ones_like(p)
        with pytest.raises(Exception, match="mixed"):
            torch.optim.AdamW([sharded, plain], foreach=True).step()
        torch.optim.AdamW([sharded, plain], foreach=_foreach_is_safe([sharded, plain])).step()
    finally:
        dist.destroy_process_group()
