"""The whole stack in one process on one GPU: ``TensorParallelStrategy`` at (dp, tp) = (1, 1) in a Lightning Trainer.

Each test trains the ``debug`` Llama (or a PEFT-wrapped transformers Llama) for a few steps on ``cuda:0`` and checks
one promise of the strategy there: the 2D mesh with FSDP2 at dp = 1; bf16-mixed against fp32; the seeded meta-device
initialisation of the sharded model (each weight drawn whole from its own generator, its shard kept) against
single-device init; per-block ``torch.compile`` against eager;
float8 at tp = 1; a sharded checkpoint saved and loaded; LoRA with its frozen base held in bf16. Sizes are tiny: these
check correctness, ``python -m benchmarks gpu`` measures speed. ``benchmarks/gpu_check.sh`` runs them with the
benchmark and prints one table (the ``key`` property each test records is its column "key number").

The Trainers share this process and its (1-rank) process group, which ``conftest.py`` removes after the module.
Without CUDA ``tests/conftest.py`` skips them; ``GPU_CHECK_DRY_RUN=1`` runs them on the CPU (``conftest.py``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from gpu_bounds import COMPILE_LOSS_REL, FLOAT8_LOSS_REL
from tolerances import LOSS_REL
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tp import CausalLMModule, Llama, TensorParallelStrategy, get_config

pytestmark = pytest.mark.gpu

SEED, SEQ, BATCH = 0, 32, 4
CONFIG = get_config("debug")  # 2 layers, h = 64, 8 query / 4 KV heads, vocab 512: every dim a multiple of 16


# ---------------------------------------------------------------------------------------------------- helpers


def samples(steps: int, *, repeat: bool = False) -> DataLoader:
    """``steps`` batches of ``(input_ids, labels)``; ``repeat``: the same ``BATCH`` rows every step (a loss that must
    fall within a few steps)."""
    rows = torch.randint(0, CONFIG.vocab_size, ((1 if repeat else steps) * BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(SEED))
    if repeat:
        rows = rows.repeat(steps, 1)
    return DataLoader(TensorDataset(rows[:, :-1], rows[:, 1:]), batch_size=BATCH)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU, its dtype kept."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def worst_rel(ours: list[float], ref: list[float]) -> float:
    assert len(ours) == len(ref) > 0, (ours, ref)
    return max(abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True))


class Losses(L.Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.values.append(float(outputs["loss"]))


class OutputDtypes(L.Callback):
    """The dtypes of the first decoder block's ``down_proj`` outputs (hooked once the strategy has set the model up)."""

    def __init__(self) -> None:
        self.seen: set[torch.dtype] = set()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        proj = pl_module.model.model.layers[0].mlp.down_proj
        proj.register_forward_hook(lambda module, args, out: self.seen.add(out.dtype))


def lm(**kwargs: Any) -> CausalLMModule:
    """The package's LightningModule around the ``debug`` Llama, built on the meta device (the strategy shards,
    materialises and initialises it with ``init_seed``)."""
    return CausalLMModule("debug", init_seed=SEED, lr=3e-3, warmup_steps=0, **kwargs)


def fit(tier: Any, module: L.LightningModule, steps: int, *, data: DataLoader | None = None,
        precision: str = "32-true", ckpt_path: str | None = None, callbacks: tuple[L.Callback, ...] = (),
        **strategy: Any) -> tuple[L.Trainer, list[float]]:
    """``steps`` optimizer steps under ``TensorParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
    **strategy)`` on one device; the Trainer and the loss of every step."""
    losses = Losses()
    trainer = L.Trainer(accelerator=tier.accelerator, devices=1, max_steps=steps, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[losses, *callbacks],
                        strategy=TensorParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, **strategy))
    trainer.fit(module, data if data is not None else samples(steps), ckpt_path=ckpt_path)
    return trainer, losses.values


# ---------------------------------------------------------------------------------------------------- the stack


def test_whole_stack_on_one_device_mesh_and_fsdp2_at_dp1(tier: Any, record_property: Any) -> None:
    """The 2D mesh at (1, 1), every parameter an FSDP2 DTensor on the data-parallel mesh and on the device, fp32
    masters under bf16-mixed, and a loss that falls on a repeated batch."""
    module = lm()
    trainer, losses = fit(tier, module, 6, data=samples(6, repeat=True), precision="bf16-mixed")
    mesh = trainer.strategy.device_mesh
    assert mesh.mesh_dim_names == ("data_parallel", "tensor_parallel") and tuple(mesh.shape) == (1, 1)
    assert mesh.device_type == torch.device(tier.device).type
    params = dict(module.model.named_parameters())
    outside = [n for n, p in params.items()
               if not (isinstance(p, DTensor) and p.device_mesh.mesh_dim_names == ("data_parallel",))]
    assert not outside, f"not FSDP2-sharded on the data-parallel mesh: {outside}"
    assert {p.device.type for p in params.values()} == {mesh.device_type}
    assert {p.dtype for p in params.values()} == {torch.float32}  # bf16 compute, fp32 masters
    assert isinstance(module.model, FSDPModule) and all(isinstance(b, FSDPModule) for b in module.model.model.layers)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    record_property("key", f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps,"
                           f" {len(params)} FSDP2 parameters")


def test_bf16_mixed_loss_tracks_fp32(tier: Any, record_property: Any) -> None:
    """Five steps under bf16-mixed against fp32 from the same init and data: every step's loss within
    ``LOSS_REL["bf16-mixed"]`` (1e-3, tests/tolerances.py). bf16 keeps 8 significant bits, a rounding of up to 2^-9
    (2e-3) relative per element; the loss is a mean over ``BATCH * SEQ`` tokens of log-softmaxes whose inputs are sums
    of many such rounded products with random signs, so its error is well below one rounding (the CPU tier measured
    1.1e-4 over five steps). The compute dtype is checked too, so that two fp32 runs cannot pass."""
    runs: dict[str, tuple[list[float], set[torch.dtype]]] = {}
    for precision in ("32-true", "bf16-mixed"):
        dtypes = OutputDtypes()
        _, losses = fit(tier, lm(), 5, precision=precision, callbacks=(dtypes,))
        runs[precision] = (losses, dtypes.seen)
    assert runs["32-true"][1] == {torch.float32} and runs["bf16-mixed"][1] == {torch.bfloat16}, runs
    worst = worst_rel(runs["bf16-mixed"][0], runs["32-true"][0])
    record_property("key", f"loss rel. err. {worst:.1e} (bound {LOSS_REL['bf16-mixed']:.0e})")
    assert worst <= LOSS_REL["bf16-mixed"], runs


def test_meta_init_through_dtensor_rng_equals_single_device_init(tier: Any, record_property: Any) -> None:
    """On CUDA the strategy shards the meta-device model first (FSDP2 DTensors) and then calls ``init_weights(seed)``
    (``lightning_tp.parallel.parallelize.materialize``). With a seed each weight draws its full tensor on the GPU from
    a generator of its own, seeded from the seed and its name, and keeps its shard's slice, never through DTensor's
    RNG tracker; so the weights equal ``Llama(config).init_weights(seed)`` built directly on the same device, bit for
    bit, at this one-shard layout as at any other (``tests/unit/models/test_seeded_init.py`` checks sharded layouts
    on the CPU). (On the CPU the strategy initialises before sharding, so a dry run compares two plain
    initialisations.)"""
    module = lm()
    fit(tier, module, 0)  # set-up only: shard, materialise, initialise
    ours = {n: p for n, p in module.model.named_parameters()}
    assert all(isinstance(p, DTensor) for p in ours.values())
    with torch.device(tier.device):
        ref = Llama(CONFIG)
    ref.init_weights(seed=SEED)
    refs = dict(ref.named_parameters())
    assert ours.keys() == refs.keys()
    differ = [n for n in ours if not torch.equal(full(ours[n]), full(refs[n]))]
    how = "sharded on CUDA, then initialised" if torch.device(tier.device).type == "cuda" else "CPU: before sharding"
    record_property("key", f"{len(ours) - len(differ)}/{len(ours)} parameters equal ({how})")
    assert not differ, (f"{len(differ)} of {len(ours)} parameters differ from the single-device init with the same"
                        f" seed, in init order: {differ[:4]}")


def test_per_block_compile_equals_eager(tier: Any, record_property: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True`` (each decoder block's forward through ``torch.compile``, before FSDP2) against eager, fp32,
    three steps: losses within ``COMPILE_LOSS_REL``; dynamo compiled the blocks (a graph exists) without a
    recompilation per block (blocks share their code, so one graph serves them)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    if tier.dry_run:  # inductor's CPU code generation takes minutes here: dynamo traces, the graphs run eagerly
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    _, eager = fit(tier, lm(), 3)
    torch._dynamo.reset()
    counters.clear()
    _, compiled = fit(tier, lm(), 3, compile=True)
    graphs = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    worst = worst_rel(compiled, eager)
    record_property("key", f"loss rel. err. {worst:.1e} (bound {COMPILE_LOSS_REL:.0e}), {graphs} graph(s)")
    assert graphs >= 1, "compile=True compiled nothing"
    assert graphs < CONFIG.num_hidden_layers, f"{graphs} graphs for {CONFIG.num_hidden_layers} blocks: one per block"
    assert worst <= COMPILE_LOSS_REL, (compiled, eager)


def test_float8_at_tp1_trains_close_to_bf16(tier: Any, record_property: Any) -> None:
    """``float8=True`` at tp = 1 (torchao's float8 linears in the decoder blocks, FSDP2 at dp = 1) under bf16-mixed:
    the blocks' projections are torchao ``Float8Linear`` and three steps' losses stay within ``FLOAT8_LOSS_REL`` of
    the bf16 run's."""
    device = torch.device(tier.device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = (f"{torch.cuda.get_device_name(device)}, compute capability"
                 f" {'.'.join(map(str, torch.cuda.get_device_capability(device)))}" if device.type == "cuda"
                 else "a CPU (dry run)")
        pytest.skip(f"float8 needs a CUDA device of compute capability >= 8.9 (H100, H200, L40S); this run is on"
                    f" {where}")
    pytest.importorskip("torchao.float8", reason="float8 needs torchao, which is not installed (pip install torchao)")
    _, bf16 = fit(tier, lm(), 3, precision="bf16-mixed")
    module = lm()
    _, f8 = fit(tier, module, 3, precision="bf16-mixed", float8=True)
    kinds = {type(m).__name__ for m in module.model.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"Float8Linear"}, kinds
    assert all(math.isfinite(x) for x in f8), f8
    worst = worst_rel(f8, bf16)
    record_property("key", f"loss rel. err. vs bf16 {worst:.1e} (bound {FLOAT8_LOSS_REL:.0e})")
    assert worst <= FLOAT8_LOSS_REL, (f8, bf16)


def test_sharded_checkpoint_round_trip(tier: Any, record_property: Any, tmp_path: Path) -> None:
    """Two steps, ``trainer.save_checkpoint`` (a sharded DCP directory: ``save_distributed_checkpoint=True``), then a
    fresh module resumed from it: at the start of its training the weights and AdamW's state equal those saved, bit
    for bit, and it trains the remaining steps."""
    first = lm()
    trainer, _ = fit(tier, first, 2)
    saved = {n: full(p) for n, p in first.model.named_parameters()}
    opt = trainer.optimizers[0]
    saved_state = [{k: full(v) for k, v in opt.state[p].items()} for group in opt.param_groups
                   for p in group["params"]]
    ckpt = tmp_path / "ckpt"
    trainer.save_checkpoint(ckpt)
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file(), sorted(p.name for p in tmp_path.rglob("*"))

    class AtStart(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            opt = trainer.optimizers[0]
            self.weights = {n: full(p) for n, p in pl_module.model.named_parameters()}
            self.state = [{k: full(v) for k, v in opt.state[p].items()} for group in opt.param_groups
                          for p in group["params"]]
            self.step = trainer.global_step

    start = AtStart()
    _, losses = fit(tier, lm(), 4, ckpt_path=str(ckpt), callbacks=(start,))
    assert start.step == 2 and len(losses) == 2, (start.step, losses)
    assert start.weights.keys() == saved.keys()
    assert [n for n in saved if not torch.equal(start.weights[n], saved[n])] == []
    assert len(start.state) == len(saved_state) > 0
    for ours, ref in zip(start.state, saved_state, strict=True):
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    record_property("key", f"{len(saved)} weights + AdamW state equal after load, {size / 2**10:.0f} KiB")


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_with_its_frozen_base_in_bf16(tier: Any, record_property: Any) -> None:
    """A PEFT-wrapped tiny transformers Llama under the strategy with bf16-mixed (docs/lora.md): the frozen base is
    held in bf16 only (no fp32 master) and left out of FSDP2, the adapters are fp32 FSDP2 DTensors, the base is
    unchanged after training, the adapters changed, and the loss falls on a repeated batch."""
    peft = pytest.importorskip("peft", reason="LoRA needs PEFT (pip install 'lightning-tp[lora]')")
    transformers = pytest.importorskip("transformers", reason="LoRA's model is a transformers Llama")

    torch.manual_seed(SEED)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=CONFIG.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                      init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            input_ids, labels = batch
            logits = self.model(input_ids=input_ids).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)  # as users write it: frozen parameters included

    _, losses = fit(tier, Lit(), 6, data=samples(6, repeat=True), precision="bf16-mixed")
    after = dict(model.named_parameters())
    frozen = {n for n, p in after.items() if not p.requires_grad}
    trained = set(after) - frozen
    assert len(trained) == 2 * len(targets) * 2 and all(".lora_" in n for n in trained), sorted(trained)[:4]
    assert {after[n].dtype for n in frozen} == {torch.bfloat16}
    assert {after[n].dtype for n in trained} == {torch.float32}
    assert not any(isinstance(after[n], DTensor) for n in frozen)  # TP-sharded only, and tp = 1: plain tensors
    assert all(isinstance(after[n], DTensor) for n in trained)  # FSDP2 shards what trains
    assert {after[n].device.type for n in after} == {torch.device(tier.device).type}
    changed = [n for n in frozen if not torch.equal(full(after[n]), before[n].to(torch.bfloat16))]
    assert changed == [], f"the frozen base changed: {changed[:4]}"
    assert all(not torch.equal(full(after[n]), before[n]) for n in trained)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    record_property("key", f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, base bf16 x{len(frozen)} unchanged,"
                           f" {len(trained)} fp32 adapters")
