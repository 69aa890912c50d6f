"""A causal language-modelling :class:`~lightning.pytorch.LightningModule` around :class:`Llama`.

The module is written for :class:`lightning_tp.strategy.TensorParallelStrategy` but also runs under
any plain single-device or DDP strategy:

* Under a model-parallel strategy (one that sets :attr:`LightningModule.device_mesh`),
  :meth:`CausalLMModule.configure_model` builds the network on the **meta** device; the strategy
  shards, materialises and calls :meth:`Llama.init_weights`. Without a device mesh nobody would
  materialise a meta model, so the network is built directly on the current device and initialised
  here with ``init_seed``.
* Under loss parallel the logits are a vocab-sharded ``DTensor`` and the strategy wraps the steps in
  ``loss_parallel()``; the steps therefore touch the logits only through
  :func:`torch.nn.functional.cross_entropy`.
* Logged metrics are reduced over the **data-parallel** ranks only (tensor-parallel ranks hold
  replicas of the same loss and must not be counted twice).
* With ``lora=`` the network is PEFT's ``get_peft_model(Llama, LoraConfig(...))``, built on meta
  like the plain one: the strategy's plan shards the base and the adapters together, and only the
  adapters train (:func:`lora_model`; PEFT is the ``lora`` extra, imported only then).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_tp.errors import UnsupportedFeatureError
from lightning_tp.models import Llama, LlamaConfig, get_config
from lightning_tp.parallel.dtensor import full

__all__ = ["LORA_INSTALL", "CausalLMModule", "TokenMeanLoss", "import_peft", "lora_model",
           "parameter_counts", "split_batch", "warmup_cosine_factor", "weight_decay_groups"]

LORA_INSTALL = 'pip install "lightning-tp[lora]"'
"""What installs PEFT, the optional dependency of LoRA."""


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int,
                         min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate after ``step`` scheduler steps.

    Linear warm-up ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps`` (so the very
    first optimizer step already has a non-zero learning rate), exactly ``1`` at
    ``step == warmup_steps``, then a half cosine down to ``min_lr_ratio`` at ``step == max_steps``,
    and ``min_lr_ratio`` afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0 if step == warmup_steps else min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups: matrices (embeddings, projections) decay, 1-D tensors (norm weights)
    do not.

    Parameters that do not require gradients are dropped; shared (tied) parameters appear once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def _foreach_is_safe(params: Iterable[Tensor]) -> bool:
    """Whether the multi-tensor (``foreach``) optimizer kernels can take these parameters together.

    ``torch._foreach_*`` ops reject a mix of plain tensors and DTensors, and DTensors that live on
    different device meshes (e.g. tensor-parallel-only parameters next to FSDP+TP ones). For such
    mixes the optimizer must fall back to the per-parameter loop (``foreach=False``). Only exercised
    single-process in the tests.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return True
    kinds: set[Any] = set()
    for param in params:
        kinds.add(param.device_mesh if isinstance(param, DTensor) else "plain")
        if len(kinds) > 1:
            return False
    return True


def split_batch(batch: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(input_ids, labels)`` from a ``{"input_ids", "labels"}`` mapping or an
    ``(input_ids, labels)`` pair."""
    if isinstance(batch, Mapping):
        missing = {"input_ids", "labels"} - set(batch)
        if missing:
            raise KeyError("The batch must contain 'input_ids' and 'labels' (already shifted);"
                           f" missing {missing}")
        return batch["input_ids"], batch["labels"]
    if isinstance(batch, Sequence) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "Expected a batch dict with 'input_ids' and 'labels' or a tuple (input_ids, labels), got"
        f" {type(batch).__name__}"
    )


class TokenMeanLoss(Metric):
    """Token-weighted mean of per-micro-batch mean losses, with the token count.

    ``update(loss, num_tokens)`` adds ``loss * num_tokens`` and ``num_tokens``; ``compute()``
    returns ``{"loss": Σ loss·n / Σ n, "tokens": Σ n}``. Both sums sit in one float64 state so a
    distributed sync is a single gather; pass ``process_group=`` to restrict the sync to the
    data-parallel ranks. (torchmetrics' ``Perplexity`` needs the full logits, which loss parallel
    never materialises.)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    totals: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("totals", default=torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss: Tensor, num_tokens: Tensor | int) -> None:
        n = torch.as_tensor(num_tokens, device=self.totals.device, dtype=torch.float64)
        loss = loss.detach().to(device=self.totals.device, dtype=torch.float64)
        self.totals += torch.stack([loss * n, n])

    def compute(self) -> dict[str, Tensor]:
        return {"loss": self.totals[0] / self.totals[1], "tokens": self.totals[1]}


def import_peft(what: str = "LoRA") -> Any:
    """The ``peft`` package; :class:`UnsupportedFeatureError` naming the install command when it is
    missing (``what`` says who needs it)."""
    try:
        import peft
    except ImportError as e:
        raise UnsupportedFeatureError(
            f"{what} needs PEFT (the `peft` package), which is not installed ({e}). Fix:"
            f" {LORA_INSTALL}, or fine-tune every weight (peft=none).") from e
    return peft


def lora_model(model: nn.Module, *, rank: int, alpha: float, dropout: float,
               target_modules: Sequence[str], base: str | None = None) -> nn.Module:
    """``peft.get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
    target_modules=...))``: ``model``'s weights frozen, rank-``rank`` adapters beside each module
    named (by its last path component) in ``target_modules``. On a meta ``model`` the adapters are
    meta too; whoever materialises the model initialises them by their config
    (:func:`lightning_tp.parallel.lora.reset_adapters`). ``base`` (the checkpoint the base weights
    come from) becomes the config's ``base_model_name_or_path``, which adapter exports record."""
    peft = import_peft()
    config = peft.LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout),
                             target_modules=list(target_modules))
    wrapped = peft.get_peft_model(model, config)
    # get_peft_model sets it from the model's `name_or_path`, which a native Llama does not have
    wrapped.peft_config["default"].base_model_name_or_path = base
    return wrapped


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """``{"trainable", "total"}`` elements of ``module``'s parameters and ``"total_bytes"`` of them
    in their dtypes (tied ones once; full sizes, also for sharded or meta parameters)."""
    trainable = total = total_bytes = 0
    for param in module.parameters():
        total += param.numel()
        total_bytes += param.numel() * param.element_size()
        trainable += param.numel() if param.requires_grad else 0
    return {"trainable": trainable, "total": total, "total_bytes": total_bytes}


def _resolve_config(model: str | LlamaConfig | Mapping[str, Any]) -> LlamaConfig:
    if isinstance(model, LlamaConfig):
        return model
    if isinstance(model, str):
        return get_config(model)
    if isinstance(model, Mapping):
        return LlamaConfig(**model)
    raise TypeError("`model` must be a preset name, a LlamaConfig or a dict of its fields, got"
                    f" {type(model)}")


class CausalLMModule(L.LightningModule):
    """Next-token prediction with a :class:`Llama`.

    Args:
        model: a preset name for :func:`get_config`, a :class:`LlamaConfig`, or a dict of its fields
            (the form stored in checkpoints' hyper-parameters).
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay for matrices; 1-D parameters (norm weights) get none.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warm-up.
        max_steps: step at which the cosine decay reaches ``min_lr_ratio * lr``; ``None`` means
            ``trainer.max_steps`` if positive, else ``trainer.estimated_stepping_batches``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        ignore_index: label value excluded from the loss and the token count.
        init_seed: seed for :meth:`Llama.init_weights`; read by the strategy when it materialises
            the model, and used here when the model is built without a device mesh.
        llama: an already-built (and initialised) network to train instead of building one; its
            config wins over ``model``. It is not saved as a hyper-parameter; its config is.
        lora: LoRA instead of full fine-tuning: the keyword arguments of :func:`lora_model`
            (``rank``, ``alpha``, ``dropout``, ``target_modules``, optionally ``base``) as plain
            data (a hyper-parameter). The network becomes the PEFT model; only the adapters train.

    Batches are ``{"input_ids": (bs, seqlen), "labels": (bs, seqlen)}`` or ``(input_ids, labels)``,
    with labels already shifted (``labels[:, t]`` is the target of position ``t``).
    """

    def __init__(
        self,
        model: str | LlamaConfig | Mapping[str, Any] = "debug",
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        ignore_index: int = -100,
        init_seed: int | None = None,
        *,
        llama: nn.Module | None = None,
        lora: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if llama is not None and isinstance(getattr(llama, "config", None), LlamaConfig):
            self.config: LlamaConfig = llama.config
        else:
            self.config = _resolve_config(model)
        # Hyper-parameters must be plain data (YAML, checkpoints); a config object is stored as a
        # dict, which `_resolve_config` accepts back in `load_from_checkpoint`.
        model_hparam = (model if isinstance(model, str) and llama is None
                        else dataclasses.asdict(self.config))
        self.save_hyperparameters(
            {
                "model": model_hparam,
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": tuple(betas),
                "warmup_steps": warmup_steps,
                "max_steps": max_steps,
                "min_lr_ratio": min_lr_ratio,
                "ignore_index": ignore_index,
                "init_seed": init_seed,
                "lora": None if lora is None else dict(lora),
            }
        )
        self.init_seed = init_seed
        self.ignore_index = ignore_index
        if llama is None:
            # Built on the meta device: no memory, but the strategy can check the plan and shapes in
            # the launching process before any rank is spawned. Weights get storage and values
            # later, once.
            with torch.device("meta"):
                llama = Llama(self.config)
        if lora is not None:
            llama = lora_model(llama, **lora)
        self.model: nn.Module = llama
        # Metrics are created lazily on first use, i.e. after the strategy has materialised the
        # module: `Module.to_empty()` would otherwise overwrite their states *and* defaults with
        # uninitialised memory, and a precision plugin's `.to(dtype)` would downcast their float64
        # sums.
        self.loss_metrics = nn.ModuleDict()
        # unmasked training tokens of all data-parallel replicas
        self._tokens_seen: Tensor | int = 0

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        """Materialise a meta-device model when no model-parallel strategy will.

        With a device mesh (:class:`~lightning_tp.TensorParallelStrategy`) the strategy shards,
        materialises and calls ``init_weights(init_seed)``; without one the model gets storage on
        this module's device here.
        """
        if self._mesh() is None and any(p.is_meta for p in self.model.parameters()):
            from lightning_tp.parallel.lora import reset_adapters

            self.model.to_empty(device=self.device)
            self.model.init_weights(seed=self.init_seed)  # a PeftModel forwards it to the Llama
            reset_adapters(self.model, self.init_seed)  # their own init, not a projection's

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits (bs, seqlen, vocab); a vocab-sharded DTensor under loss parallel."""
        return self.model(input_ids)

    def compute_loss(self, batch: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(loss, num_tokens)``: mean cross-entropy over the unmasked tokens of the batch and
        their count."""
        input_ids, labels = split_batch(batch)
        logits = self(input_ids)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=self.ignore_index,
            reduction="mean"
        )
        num_tokens = (labels != self.ignore_index).sum()
        return loss, num_tokens

    # ------------------------------------------------------------------ distributed helpers

    def _mesh(self) -> Any:
        try:
            return getattr(self, "device_mesh", None)
        except RuntimeError:  # a strategy's mesh accessed before its processes exist
            return None

    def data_parallel_group(self) -> Any:
        """Process group of the data-parallel replicas, or ``None`` (all ranks / no distributed)."""
        mesh = self._mesh()
        if mesh is None:
            return None
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if "data_parallel" in names:
            return mesh["data_parallel"].get_group()
        return None

    def _loss_metric(self, name: str, device: torch.device, sync_on_step: bool) -> TokenMeanLoss:
        # Names must not shadow nn.Module attributes of the ModuleDict ("train", "eval", ...).
        if name not in self.loss_metrics:
            self.loss_metrics[name] = TokenMeanLoss(
                process_group=self.data_parallel_group(), dist_sync_on_step=sync_on_step
            ).to(device)
        metric = self.loss_metrics[name]
        if metric.device != device:
            metric.to(device)
        return metric

    def _log_kwargs(self) -> dict[str, Any]:
        return {"sync_dist": True, "sync_dist_group": self.data_parallel_group()}

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Mapping[str, Tensor] | Sequence[Tensor],
                      batch_idx: int) -> Tensor:
        """Mean cross-entropy of the micro-batch; logs ``train/loss``, ``train/ppl``,
        ``train/tokens``.

        The logged values are token-weighted over the data-parallel replicas of this micro-batch
        (one gather per step); ``train/tokens`` counts the unmasked target tokens of all
        data-parallel replicas and ``train/tokens_seen`` their running total.
        """
        loss, num_tokens = self.compute_loss(batch)
        metric = self._loss_metric("train_loss", num_tokens.device, sync_on_step=True)
        # this micro-batch, synced over data parallel
        stats = metric(full(loss.detach()), num_tokens)
        # A device tensor, so that counting does not force a host sync every step.
        self._tokens_seen = stats["tokens"] + self._tokens_seen
        batch_size = split_batch(batch)[0].shape[0]
        step = {"on_step": True, "on_epoch": False, "batch_size": batch_size}
        self.log("train/loss", stats["loss"].float(), prog_bar=True, **step)
        self.log("train/ppl", stats["loss"].exp().float(), **step)
        self.log("train/tokens", stats["tokens"].float(), **step)
        self.log("train/tokens_seen", self._tokens_seen, **step)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor] | Sequence[Tensor],
                        batch_idx: int) -> Tensor:
        """Mean cross-entropy of the batch; accumulated token-weighted into the epoch's
        ``val/loss``."""
        loss, num_tokens = self.compute_loss(batch)
        metric = self._loss_metric("val_loss", num_tokens.device, sync_on_step=False)
        metric.update(full(loss.detach()), num_tokens)
        return loss

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss`` (token-weighted over all batches and data-parallel ranks) and
        ``val/ppl``."""
        if "val_loss" not in self.loss_metrics or not self.loss_metrics["val_loss"].update_called:
            return
        metric = self.loss_metrics["val_loss"]
        stats = metric.compute()  # syncs over the data-parallel group
        metric.reset()
        # Identical on every rank after the sync; sync_dist over the same group keeps Lightning from
        # warning.
        self.log("val/loss", stats["loss"].float(), prog_bar=True, **self._log_kwargs())
        self.log("val/ppl", stats["loss"].exp().float(), **self._log_kwargs())
        self.log("val/tokens", stats["tokens"].float(), **self._log_kwargs())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = int(self._tokens_seen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._tokens_seen = int(checkpoint.get("tokens_seen", 0))

    # ------------------------------------------------------------------ optimisation

    def _resolve_max_steps(self) -> int:
        if self.hparams["max_steps"] is not None:
            return int(self.hparams["max_steps"])
        try:
            trainer = self.trainer
        except RuntimeError as err:
            raise RuntimeError("Pass `max_steps=` or attach the module to a Trainer to size the LR"
                               " schedule") from err
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        estimated = trainer.estimated_stepping_batches
        if not math.isfinite(estimated):
            raise ValueError("Cannot size the cosine schedule of an endless run; pass `max_steps=`")
        return int(estimated)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on 1-D parameters) with linear warm-up then cosine decay, stepped per
        optimizer step."""
        hp = self.hparams
        groups = weight_decay_groups(self.named_parameters(), hp["weight_decay"])
        params = [p for group in groups for p in group["params"]]
        # `foreach` kernels fail on plain tensors mixed with DTensors or on DTensors of different
        # meshes; fall back to the per-parameter loop then, otherwise let torch choose (None).
        foreach = None if _foreach_is_safe(params) else False
        optimizer = torch.optim.AdamW(groups, lr=hp["lr"], betas=tuple(hp["betas"]),
                                      foreach=foreach)
        schedule = functools.partial(
            warmup_cosine_factor,
            warmup_steps=int(hp["warmup_steps"]),
            max_steps=self._resolve_max_steps(),
            min_lr_ratio=float(hp["min_lr_ratio"]),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
