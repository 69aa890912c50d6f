"""Typed schemas behind the Hydra configs in ``conf/``, and the one function that composes them.

Each YAML file under ``conf/`` extends one of these dataclasses (its ``defaults`` list names the
schema), so an unknown key or a value of the wrong type fails at start-up with Hydra's message
naming the key. :func:`register_configs` puts them in Hydra's ``ConfigStore``;
:func:`compose_config` is the one place that calls Hydra's compose API (the recipes through
:func:`compose_recipe`, the planner through :func:`lightning_tp.planner.compose_inputs`).
:class:`StrategyConfig` is generated from the signature of
:class:`lightning_tp.TensorParallelStrategy`, so it has every argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from lightning_tp.errors import LightningTPError
from lightning_tp.strategy import TensorParallelStrategy

__all__ = [
    "CONF_DIR",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PeftConfig",
    "peft_problems",
    "PretrainConfig",
    "PretrainDataConfig",
    "RecipeConfigError",
    "SchedulerConfig",
    "StrategyConfig",
    "TrainerConfig",
    "compose_config",
    "compose_recipe",
    "register_configs",
]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The recipes' Hydra config directory, shipped in the package (``lightning_tp/conf``; a clone's
top-level ``conf`` links to it). Also importable by Hydra as the module ``lightning_tp.conf``."""


class RecipeConfigError(LightningTPError):
    """A recipe override names a key the schema does not have, gives a value of the wrong type, or
    a value the recipe cannot use (``peft.*``: :mod:`lightning_tp.recipes.lora`)."""


@dataclass
class ModelConfig:
    """A named Llama preset, with optional field overrides (None keeps the preset's value)."""

    name: str = "small"
    """Preset name (see ``lightning_tp.models.list_presets()``)."""
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None


def _schema_type(annotation: Any) -> Any:
    """The OmegaConf field type for one constructor annotation; None where a value of that type
    cannot be written on a command line (a dict of styles, a callable).

    ``bool``/``int``/``float``/``str`` stay; ``Literal["a", "b"]`` is ``str`` (the constructor
    checks the choice); a ``timedelta`` is ``float`` seconds; a union of several writable types
    (``"auto"`` or an int) is ``Any``; ``Optional[T]`` stays optional.
    """
    if annotation in (bool, int, float, str):
        return annotation
    if annotation is timedelta:
        return float
    if get_origin(annotation) is Literal and all(isinstance(a, str) for a in get_args(annotation)):
        return str
    if get_origin(annotation) is not Union:
        return None
    members = [a for a in get_args(annotation) if a is not type(None)]
    kinds = {_schema_type(a) for a in members} - {None}
    kind = kinds.pop() if len(kinds) == 1 else Any
    return Optional[kind] if len(members) < len(get_args(annotation)) and kind is not Any else kind


def _schema_default(default: Any) -> Any:
    return default.total_seconds() if isinstance(default, timedelta) else default


def _strategy_schema() -> type:
    """A dataclass with one field per argument of ``TensorParallelStrategy.__init__``, in order.

    What each argument means is the strategy's docstring; in the recipes ``timeout`` is seconds
    (600.0 = the constructor's 10 minutes) and ``plan`` is a registered plan name or null.
    """
    signature = inspect.signature(TensorParallelStrategy.__init__, eval_str=True)
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, field(default="lightning_tp.TensorParallelStrategy"))]
    for name, parameter in list(signature.parameters.items())[1:]:  # after self
        kind = _schema_type(parameter.annotation)
        if kind is None:
            raise TypeError(f"TensorParallelStrategy argument {name!r}: no recipe schema type for"
                            f" {parameter.annotation!r}; extend lightning_tp.recipes.config"
                            "._schema_type.")
        fields.append((name, kind, field(default=_schema_default(parameter.default))))
    schema = dataclasses.make_dataclass("StrategyConfig", fields)
    schema.__module__, schema.__qualname__ = __name__, "StrategyConfig"
    schema.__doc__ = ("Arguments of :class:`lightning_tp.TensorParallelStrategy`, generated from"
                      " its signature.")
    return schema


StrategyConfig = _strategy_schema()


@dataclass
class TrainerConfig:
    """The ``lightning.Trainer`` arguments a recipe exposes."""

    _target_: str = "lightning.Trainer"
    accelerator: str = "auto"
    devices: Any = "auto"
    """'auto' (all GPUs, or 4 CPU processes on a CPU machine — see the cpu trainer config) or an
    int."""
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 200
    val_check_interval: Any = 50
    check_val_every_n_epoch: Optional[int] = None
    """None: ``val_check_interval`` counts optimizer steps across epochs."""
    limit_val_batches: Any = 8
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    deterministic: bool = False


@dataclass
class OptimizerConfig:
    """AdamW."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class SchedulerConfig:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""

    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class LoggerConfig:
    """Where metrics go: CSV always when enabled, TensorBoard when the package is installed."""

    csv: bool = True
    tensorboard: str = "auto"
    """'auto' (when installed), 'true' or 'false'."""


@dataclass
class PretrainDataConfig:
    """Arguments of :class:`lightning_tp.data.pretrain.PretrainDataModule`."""

    _target_: str = "lightning_tp.data.pretrain.PretrainDataModule"
    path: Any = None
    """Files, globs or directories; null = the embedded corpus (Python's standard library
    sources)."""
    tokenizer: str = "byte"
    seq_len: int = 128
    batch_size: int = 8
    val_fraction: float = 0.02
    seed: int = 0
    cache_dir: str = ".cache/lightning_tp"
    max_bytes: Optional[int] = None
    num_workers: int = 0


@dataclass
class FinetuneDataConfig:
    """Arguments of :class:`lightning_tp.data.finetune.FinetuneDataModule`."""

    _target_: str = "lightning_tp.data.finetune.FinetuneDataModule"
    path: Optional[str] = None
    """A JSON/JSONL file; null = the embedded instruction set (built in code, no download)."""
    format: str = "auto"
    tokenizer: str = "byte"
    seq_len: int = 128
    batch_size: int = 8
    val_fraction: float = 0.1
    seed: int = 0
    packing: bool = False
    template: str = "alpaca"
    skip_malformed: bool = False
    hf_dataset: Optional[str] = None
    hf_split: str = "train"
    ignore_index: int = -100
    num_workers: int = 0


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every projection of a Llama-family decoder layer: what ``peft=lora`` adapts by default."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (``peft=lora``, group ``conf/peft``); ``peft=none`` trains
    every weight. LoRA uses PEFT's ``LoraConfig`` (the ``lora`` extra): the base stays frozen and
    only ``rank``-wide adapters next to ``target_modules`` train."""

    method: str = "none"
    """``none`` (full fine-tuning) or ``lora``."""
    rank: int = 16
    """LoRA rank ``r`` (``LoraConfig(r=...)``)."""
    alpha: float = 32.0
    """LoRA scaling numerator: the adapters' output is multiplied by ``alpha / rank``."""
    dropout: float = 0.05
    """Dropout on the adapters' input (``LoraConfig(lora_dropout=...)``)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names (the last path component) that get adapters."""


def peft_problems(rank: Any, dropout: Any, target_modules: Any, alpha: Any = None) -> list[str]:
    """What is wrong with the ``peft`` group's values (one message each, naming the key and an
    example): the recipe and the planner check the same rules (``alpha`` only when given)."""
    example = f"peft.target_modules=[{','.join(LORA_TARGETS)}]"
    problems = []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        problems.append(f"peft.rank={rank!r} must be a positive int (e.g. peft.rank=16)")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or alpha <= 0):
        problems.append(f"peft.alpha={alpha!r} must be a number > 0 (the adapters' output is"
                        " scaled by alpha / rank; e.g. peft.alpha=32)")
    if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1):
        problems.append(f"peft.dropout={dropout!r} must be in [0, 1) (e.g. peft.dropout=0.05)")
    if (not isinstance(target_modules, Sequence) or isinstance(target_modules, str)
            or not target_modules or not all(isinstance(t, str) and t for t in target_modules)):
        problems.append(f"peft.target_modules={target_modules!r} must be a non-empty list of"
                        f" module names (e.g. {example})")
    return problems


@dataclass
class _RunConfig:
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    trainer: TrainerConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    out_dir: str = MISSING
    """Checkpoints, logs and Hydra's own files go here."""
    resume: Optional[str] = None
    """A checkpoint to resume training from ('last' = out_dir/last if it exists)."""
    checkpoint_every_n_steps: Optional[int] = None
    """Save a sharded checkpoint every N steps (always one at the end, as out_dir/last)."""
    sample_prompt: str = "def "
    """Text to continue after training, printed by rank 0; empty to skip."""
    sample_tokens: int = 48
    """At most this many new tokens (EOS ends the sample sooner)."""
    sample_temperature: float = 0.8
    """Softmax temperature of the sample; 0 = greedy (argmax)."""
    sample_top_k: Optional[int] = 40
    """Draw from the k most likely tokens only; null = all of them, 1 = greedy."""
    sample_seed: Optional[int] = None
    """Seed of the sampling generator (the same seed gives the same sample); null = ``seed``."""


@dataclass
class PretrainConfig(_RunConfig):
    data: PretrainDataConfig = MISSING


@dataclass
class FinetuneConfig(_RunConfig):
    data: FinetuneDataConfig = MISSING
    peft: PeftConfig = field(default_factory=PeftConfig)
    """``peft=lora`` (with ``peft.rank=``, ``peft.alpha=``, ...) trains LoRA adapters only."""
    checkpoint: Optional[str] = None
    """Weights to start from: this project's sharded checkpoint (e.g. out/pretrain/last) or a
    Hugging Face model directory (config.json + safetensors; its config replaces ``model``);
    null = random init."""


def register_configs() -> None:
    """Register the two top-level schemas with Hydra (idempotent). Group options need no schema of
    their own: the top-level dataclass types every group, so each option is validated when it is
    merged in."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)


def compose_config(name: str, overrides: Sequence[str] = (), config_dir: str | Path | None = None,
                   *, job_name: str = "app", schemas: Mapping[str, type] | None = None
                   ) -> DictConfig:
    """Compose the config ``name`` of ``config_dir`` (default :data:`CONF_DIR`) with Hydra
    ``overrides``, outside any running Hydra app; Hydra's own errors propagate.

    The recipes' schemas are registered first, and ``schemas`` (``{name: dataclass}``) with them;
    an earlier global Hydra instance (a notebook's ``initialize``) is cleared first.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    for schema_name, node in (schemas or {}).items():
        ConfigStore.instance().store(name=schema_name, node=node)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), job_name=job_name,
                               version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def _type_name(annotation: Any) -> str:
    """``int``, ``Optional[float]``, ``Any``: a schema field's type as a message shows it."""
    if isinstance(annotation, str):  # a field declared under `from __future__ import annotations`
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _explain(error: BaseException, override_list: Sequence[str]) -> str | None:
    """What went wrong with an override, and the fix, from the OmegaConf error Hydra wraps; None
    if unknown."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error.__cause__
    schema = getattr(cause, "object_type", None)
    full_key, key = getattr(cause, "full_key", None), getattr(cause, "key", None)
    if not (full_key and key and dataclasses.is_dataclass(schema)):
        return None
    fields = {f.name: f for f in dataclasses.fields(schema) if not f.name.startswith("_")}
    group = full_key[: -len(str(key))]
    given = next((o for o in override_list if o.lstrip("+~").split("=", 1)[0] == full_key),
                 full_key)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(group + c for c in close)}?" if close
                else "check the spelling.")
        return (f"Unknown key {full_key!r} in the override {given!r}: the schema"
                f" {schema.__name__} has no field {str(key)!r}; {hint} Fix: use one of its keys"
                f" ({', '.join(sorted(fields))}); print the whole config with --cfg job.")
    if isinstance(cause, ValidationError) and str(key) in fields:
        f = fields[str(key)]
        default = f.default if f.default is not dataclasses.MISSING else None
        example = ""
        if default is not None and not isinstance(default, (list, dict)):
            shown = str(default).lower() if isinstance(default, bool) else default
            example = f" (e.g. {full_key}={shown})"
        kind = _type_name(f.type)
        return (f"Wrong type in the override {given!r}: {full_key} takes {kind}, got"
                f" {getattr(cause, 'value', None)!r} ({str(cause).splitlines()[0]}). Fix: set"
                f" {full_key} to a value of type {kind}{example}.")
    return None


def compose_recipe(recipe: str, overrides: Sequence[str] = (),
                   config_dir: str | Path | None = None) -> DictConfig:
    """Compose ``recipe`` (``"pretrain"`` or ``"finetune"``) with ``overrides``, as
    ``lightning-tp RECIPE`` would.

    A misspelled key or a value of the wrong type raises :class:`RecipeConfigError` naming the
    override, the schema's close matches or the expected type, and the fix (Hydra's own error is
    its ``__cause__``).
    """
    from hydra.errors import ConfigCompositionException

    try:
        return compose_config(recipe, overrides, config_dir)
    except ConfigCompositionException as e:
        message = _explain(e, overrides)
        if message is None:
            raise
        raise RecipeConfigError(message) from e
