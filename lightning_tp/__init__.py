"""lightning-tp: Megatron-style tensor parallelism for PyTorch Lightning as a one-line change.

Importing this package registers the strategy names ``"tensor_parallel"``,
``"tensor_parallel_no_sp"``, ``"tensor_parallel_no_loss_parallel"`` and
``"tensor_parallel_tp_only"`` with Lightning, so ``Trainer(strategy="tensor_parallel")`` works once
``import lightning_tp`` has run.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_tp.errors import (
    LightningTPError,
    MeshConfigError,
    ModelShapeError,
    PlanError,
    SequenceLengthError,
)
from lightning_tp.models import Llama, LlamaConfig, get_config, list_presets
from lightning_tp.parallel.plans import PLANS, llama_plan, per_projection_llama_plan, register_plan
from lightning_tp.strategy import TensorParallelStrategy
from lightning_tp.training.callbacks import ThroughputMonitor
from lightning_tp.training.module import CausalLMModule

TensorParallelStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"

__all__ = [
    "PLANS",
    "CausalLMModule",
    "LightningTPError",
    "Llama",
    "LlamaConfig",
    "MeshConfigError",
    "ModelShapeError",
    "PlanError",
    "SequenceLengthError",
    "TensorParallelStrategy",
    "ThroughputMonitor",
    "get_config",
    "list_presets",
    "llama_plan",
    "per_projection_llama_plan",
    "register_plan",
]
