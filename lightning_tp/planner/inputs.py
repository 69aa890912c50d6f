"""The planner's inputs: :class:`PlanInputs` (one resolved layout, validated), its Hydra schema
:class:`PlanConfig` (``conf/plan.yaml``), and :func:`compose_inputs`, which turns command-line
overrides into both.

The size, flag and precision rules are the strategy's own (:mod:`lightning_tp.config`); this module
adds only what the planner needs beyond them (a positive micro-batch, a known accelerator peak,
sequence parallelism that divides the sequence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_tp.config import AC_MODES, ParallelConfig, check_precision, split_grid
from lightning_tp.config import grid_problems as strategy_grid_problems
from lightning_tp.errors import MeshConfigError, PrecisionConfigError
from lightning_tp.hardware import Accelerator, Link, get_accelerator, get_link, load_hardware
from lightning_tp.models.config import LlamaConfig, get_config
from lightning_tp.planner.checkpoint import checkpoint_model
from lightning_tp.planner.errors import PlannerError
from lightning_tp.planner.grid import grid_problems
from lightning_tp.planner.modes import AC_BY_RECOMPUTE
from lightning_tp.recipes.config import (
    CONF_DIR,
    LORA_TARGETS,
    ModelConfig,
    PeftConfig,
    PretrainDataConfig,
    StrategyConfig,
    TrainerConfig,
    compose_config,
    peft_problems,
)

__all__ = ["Lora", "PlanConfig", "PlanInputs", "PlannerError", "compose_inputs", "resolve_inputs"]

_STRATEGY = ParallelConfig()
"""The strategy's defaults, which :class:`PlanInputs` shares for the modes both describe."""


@dataclass
class PlanConfig:
    """Hydra schema of ``conf/plan.yaml``: the recipe groups plus what only the planner needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: Optional[str] = None
    """A Hugging Face model directory or its config.json: the model to plan, instead of
    ``model`` (any family ``plan="auto"`` covers or derives; :mod:`.checkpoint`)."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """The strategy's arguments (the recipes' schema, activation checkpointing, float8 and async TP
    included)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    """``peft=none`` (every weight trains) or ``peft=lora`` (the finetune recipe's group: the base
    frozen, rank-``peft.rank`` adapters on ``peft.target_modules``)."""
    accelerator: str = "h100"
    """Name in lightning_tp.hardware.ACCELERATORS (h100, h200, a100, or one you add)."""
    link: str = "auto"
    """Inter-node link for collectives whose group spans nodes; auto = the accelerator's."""
    intra_node_link: str = "auto"
    """Link inside a node; auto = the accelerator's (NVLink)."""
    devices_per_node: Optional[int] = None
    """None = ``trainer.devices`` if it is an int, else the accelerator's node size."""
    float8_all_gather: bool = False
    """With ``strategy.float8``: FSDP2 all-gathers the decoder blocks' linear weights in float8
    (torchtitan's ``enable_fsdp_float8_all_gather``), 1 byte per element instead of the compute
    dtype's. The strategy has no such option: this plans what it would buy."""
    efficiency: Optional[float] = None
    """Fraction of peak FLOP/s the kernels sustain (communication excluded); None = the
    accelerator's default (H100/H200 0.4, A100 0.65); see docs/planner.md."""
    memory_headroom: float = 0.1
    """Fraction of device memory kept free (allocator fragmentation, CUDA context, NCCL buffers)."""
    hardware_file: Optional[str] = None
    """JSON/YAML file of extra accelerators/links (see lightning_tp.hardware)."""
    output: str = "text"
    """text | json."""
    top: int = 5
    """How many ranked candidates the recommendation lists."""
    compare_2d: bool = False
    """Print where a 2D grid (``strategy.tensor_parallel_size=[r,c]``) moves fewer bytes and takes
    less TP time than 1D, over tp 4, 8, 16, the Llama 3 1B/8B/70B shapes and this model, and the
    crossover in tokens (:func:`~lightning_tp.planner.crossover.compare_2d`); no layout report."""


@dataclass(frozen=True)
class Lora:
    """LoRA as the strategy trains it (:mod:`lightning_tp.parallel.lora`): the base frozen, an
    ``r × in`` factor ``lora_A`` and an ``out × r`` factor ``lora_B`` next to every projection
    whose name is in ``target_modules``."""

    rank: int = 16
    alpha: float = 32.0
    """Scaling numerator (``alpha / rank``); reported, it costs nothing."""
    dropout: float = 0.05
    """Dropout on the adapters' input: above 0 each adapted projection keeps a 1-byte mask of its
    input for backward."""
    target_modules: tuple[str, ...] = tuple(LORA_TARGETS)
    """Module names PEFT matches (a path equal to one, or ending in ``.`` + one)."""

    def problems(self) -> list[str]:
        return peft_problems(self.rank, self.dropout, list(self.target_modules))


@dataclass(frozen=True)
class PlanInputs:
    """A resolved layout to evaluate: every figure the formulas need, validated."""

    config: LlamaConfig
    tp: int
    dp: int
    seq_len: int
    batch_size: int
    """Sequences per micro-batch per data-parallel replica."""
    accelerator: Accelerator
    intra_link: Link
    inter_link: Link
    accumulate: int = 1
    precision: str = "bf16-mixed"
    sequence_parallel: bool = _STRATEGY.sequence_parallel
    loss_parallel: bool = _STRATEGY.loss_parallel
    fsdp: bool = _STRATEGY.fsdp
    reshard_after_forward: bool = _STRATEGY.reshard_after_forward
    activation_checkpointing: str = _STRATEGY.activation_checkpointing
    float8: bool = _STRATEGY.float8
    """Decoder-block linears in float8 (torchao, as the strategy's ``float8=True``): their matmuls
    at the fp8 peak."""
    async_tp: bool = _STRATEGY.async_tp
    """Decoder-layer TP collectives overlapped with the matmuls (the strategy's
    ``async_tp=True``, which needs ``compile``)."""
    compile: bool = _STRATEGY.compile
    """Per-block ``torch.compile`` (the strategy's ``compile=True``): the element-wise ops between
    the matmuls fused; eager, they cost their memory traffic
    (:func:`~lightning_tp.planner.estimate.elementwise_bytes`)."""
    save_sharded_inputs: bool = _STRATEGY.save_sharded_inputs
    """Under SP without recompute, the two gathered block inputs kept as their sequence shard and
    all-gathered again in backward (the strategy's ``save_sharded_inputs=True``)."""
    float8_all_gather: bool = False
    """FSDP2 all-gathers the block linears' weights in float8 (torchtitan's
    ``enable_fsdp_float8_all_gather``; the strategy has no such option), with ``float8``."""
    devices_per_node: int = 8
    efficiency: float = 0.4
    memory_headroom: float = 0.1
    model_name: str = "custom"
    checkpoint: Optional[str] = None
    """The Hugging Face model directory or config.json planned (its transformers model on the
    meta device); None: the native Llama of ``config``."""
    lora: Optional[Lora] = None
    """LoRA fine-tuning (``peft=lora``); None: every weight trains."""
    grid: Optional[tuple[int, int]] = None
    """2D tensor parallelism: the TP group as ``(r, c)`` grid rows x columns, ``r·c = tp``
    (``strategy.tensor_parallel_size=[r,c]``; :mod:`~lightning_tp.planner.grid`); None: 1D."""

    def __post_init__(self) -> None:
        problems = []
        for key, value in (("strategy.tensor_parallel_size", self.tp),
                           ("strategy.data_parallel_size", self.dp),
                           ("data.seq_len", self.seq_len), ("data.batch_size", self.batch_size),
                           ("trainer.accumulate_grad_batches", self.accumulate),
                           ("devices_per_node", self.devices_per_node)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{key}={value!r} must be a positive int")
        if not problems:
            # The strategy's rules for its flags (async TP needs compile; where
            # save_sharded_inputs applies) and for fsdp=False with dp > 1.
            problems += ParallelConfig.problems(
                tensor_parallel_size=self.tp, data_parallel_size=self.dp,
                sequence_parallel=self.sequence_parallel, loss_parallel=self.loss_parallel,
                fsdp=self.fsdp, reshard_after_forward=self.reshard_after_forward,
                float8=self.float8, async_tp=self.async_tp, compile=self.compile,
                activation_checkpointing=(self.activation_checkpointing
                                          if self.activation_checkpointing in AC_MODES else "none"),
                save_sharded_inputs=self.save_sharded_inputs)
        try:
            check_precision(self.precision)
        except PrecisionConfigError as e:
            problems.append(f"trainer.precision: {str(e).rstrip('.')}")
        if self.activation_checkpointing not in AC_MODES:
            problems.append("strategy.activation_checkpointing="
                            f"{self.activation_checkpointing!r}: use one of"
                            f" {', '.join(AC_BY_RECOMPUTE)}")
        if self.float8 and "fp8" not in self.accelerator.peak_flops:
            problems.append(f"strategy.float8=true but accelerator={self.accelerator.name!r} has no"
                            " 'fp8' peak; use an accelerator with float8 tensor cores (h100, h200)"
                            " or strategy.float8=false")
        if self.float8_all_gather and not (self.float8 and self.fsdp):
            problems.append(f"float8_all_gather=true needs strategy.float8=true and"
                            f" strategy.fsdp=true (got float8={self.float8}, fsdp={self.fsdp}):"
                            " only FSDP2 gathers the float8 weights; set float8_all_gather=false")
        if self.async_tp and self.tp == 1:
            problems.append("strategy.async_tp=true with tensor_parallel_size=1 has no TP"
                            " collectives to overlap; set async_tp=false or tensor_parallel_size>1")
        if not 0 < self.efficiency <= 1:
            problems.append(f"efficiency={self.efficiency!r} must be in (0, 1]")
        if not 0 <= self.memory_headroom < 1:
            problems.append(f"memory_headroom={self.memory_headroom!r} must be in [0, 1)")
        if not problems and self.sequence_parallel and self.seq_len % self.tp:
            problems.append(f"data.seq_len={self.seq_len} is not divisible by"
                            f" tensor_parallel_size={self.tp} under sequence parallelism: use a"
                            f" multiple of {self.tp} or strategy.sequence_parallel=false")
        if self.lora is not None:
            problems += self.lora.problems()
        if self.grid is not None and not problems:
            cfg = self.config
            problems += grid_problems(
                tuple(self.grid), self.tp, hidden=cfg.hidden_size,
                intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads,
                kv_heads=cfg.num_key_value_heads, seq_len=self.seq_len,
                lora=self.lora is not None, sequence_parallel=self.sequence_parallel,
                save_sharded_inputs=self.save_sharded_inputs, compile=self.compile,
                async_tp=self.async_tp, float8=self.float8,
                activation_checkpointing=self.activation_checkpointing)
        if problems:
            raise PlannerError("Invalid plan inputs: " + "; ".join(problems) + ".")

    @property
    def world(self) -> int:
        return self.tp * self.dp

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch per data-parallel replica (``b·s``)."""
        return self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> PlanInputs:
        return dataclasses.replace(self, **changes)


def compose_inputs(overrides: Sequence[str]) -> tuple[PlanInputs, Any]:
    """Compose ``conf/plan.yaml`` with Hydra ``key=value`` overrides and resolve it into
    :class:`PlanInputs`; returns both."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config("plan", overrides, CONF_DIR, job_name="plan",
                             schemas={"plan_schema": PlanConfig})
    except (HydraException, OmegaConfBaseException) as e:
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        raise PlannerError(f"Cannot compose the planner config from {keys}: {e} Keys are those of"
                           " conf/plan.yaml (`lightning-tp plan --cfg` prints them); groups: model,"
                           " strategy, trainer, data, peft.") from None
    return resolve_inputs(cfg), cfg


def _grid(value: Any) -> Optional[tuple[int, int]]:
    """``(r, c)`` when ``strategy.tensor_parallel_size`` is a grid ``[r, c]``, else None."""
    if value is None:
        return None
    tp, grid = split_grid(value)  # the strategy's own reading of the size
    if grid is not None and tp == "auto":  # malformed: the strategy's message names it
        raise PlannerError("strategy.tensor_parallel_size: "
                           + "; ".join(strategy_grid_problems({"grid": grid})) + ".")
    return grid


def _sizes(cfg: Any, per_node: int) -> tuple[int, int]:
    """``(tp, dp)`` as the strategy resolves them on ``trainer.num_nodes`` nodes of ``per_node``
    devices; two explicit sizes define the world themselves. A grid ``[r, c]`` is ``tp = r·c``."""
    tp, dp = cfg.strategy.tensor_parallel_size, cfg.strategy.data_parallel_size
    grid = _grid(tp)
    tp = tp if grid is None else grid[0] * grid[1]
    num_nodes = cfg.trainer.num_nodes
    try:
        sizes = ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp,
                               fsdp=cfg.strategy.fsdp)
        if "auto" in (tp, dp):
            dp, tp = sizes.resolve(num_nodes * per_node, num_nodes)
    except MeshConfigError as e:
        raise PlannerError(f"strategy sizes: {e}") from None
    return tp, dp


def resolve_inputs(cfg: Any) -> PlanInputs:
    """:class:`PlanInputs` from a composed :class:`PlanConfig`: accelerator, links, sizes, model."""
    if cfg.hardware_file:
        load_hardware(cfg.hardware_file)
    acc = get_accelerator(cfg.accelerator)
    inter = get_link(acc.inter_node_link if cfg.link == "auto" else cfg.link)
    intra_name = cfg.intra_node_link
    intra = get_link(acc.intra_node_link if intra_name == "auto" else intra_name)
    devices = cfg.trainer.devices
    per_node = cfg.devices_per_node or (devices if isinstance(devices, int)
                                        else acc.devices_per_node)
    tp, dp = _sizes(cfg, per_node)
    grid = _grid(cfg.strategy.tensor_parallel_size)
    checkpoint, name = cfg.get("checkpoint"), cfg.model.name
    if checkpoint:  # the model is the checkpoint's; model.* does not apply
        found = checkpoint_model(str(checkpoint))
        config, name = found.config, f"{found.path.parent.name} ({found.model_type})"
        family = grid and grid_problems(grid, tp, family=found.model_type)
        if family:
            raise PlannerError("Invalid plan inputs: " + "; ".join(family) + ".")
    else:
        overrides = {k: v for k, v in cfg.model.items() if k != "name" and v is not None}
        try:
            config = get_config(cfg.model.name, **overrides)
        except KeyError as e:
            raise PlannerError(f"model={cfg.model.name!r}: {e.args[0]}") from None
    strategy = cfg.strategy
    return PlanInputs(
        config=config, tp=tp, dp=dp, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
        accelerator=acc, intra_link=intra, inter_link=inter,
        accumulate=cfg.trainer.accumulate_grad_batches, precision=cfg.trainer.precision,
        sequence_parallel=strategy.sequence_parallel, loss_parallel=strategy.loss_parallel,
        fsdp=strategy.fsdp, reshard_after_forward=strategy.reshard_after_forward,
        activation_checkpointing=strategy.activation_checkpointing, float8=strategy.float8,
        async_tp=strategy.async_tp, compile=strategy.compile,
        save_sharded_inputs=strategy.save_sharded_inputs,
        float8_all_gather=cfg.float8_all_gather, devices_per_node=per_node,
        efficiency=acc.efficiency if cfg.efficiency is None else cfg.efficiency,
        memory_headroom=cfg.memory_headroom, model_name=name,
        checkpoint=str(checkpoint) if checkpoint else None, lora=_lora(cfg.get("peft")),
        grid=grid,
    )


def _lora(peft: Any) -> Optional[Lora]:
    """:class:`Lora` of the ``peft`` group, None for ``peft.method=none``."""
    if peft is None or peft.method == "none":
        return None
    if peft.method != "lora":
        raise PlannerError(f"peft.method={peft.method!r}: the planner models 'none' (every weight"
                           " trains) and 'lora'; use peft=none or peft=lora.")
    return Lora(rank=peft.rank, alpha=float(peft.alpha), dropout=float(peft.dropout),
                target_modules=tuple(peft.target_modules))
