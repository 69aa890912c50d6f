"""Dry-run planner: memory, communication and step time of a (tp, dp, activation checkpointing)
layout, on a CPU, for full training or LoRA (``peft=lora``)::

    lightning-tp plan model=llama3_70b strategy.tensor_parallel_size=8 \\
        strategy.data_parallel_size=32
    lightning-tp plan model=llama3_70b strategy.tensor_parallel_size=8 \\
        strategy.data_parallel_size=1 peft=lora peft.rank=16

Nothing is allocated: the model is built on the meta device, the strategy's own plan is resolved
against it (:func:`lightning_tp.parallel.plans.resolve_plan`) and checked with the strategy's shape
rules (:func:`lightning_tp.parallel.shapes.check_model_shapes`); per-rank shapes follow from the
placements the plan and FSDP2 produce (tensor parallel ``Shard(d)`` then FSDP2 ``Shard(0)`` padded
to equal chunks). ``tests/unit/planner/test_planner.py`` checks those shapes against a model really
sharded under a fake process group. The formulas, their sources and how the estimates compare with
published runs are in ``docs/planner.md``.

The modules, each depending only on those above it:

* :mod:`~lightning_tp.planner.modes`: bytes per element of each precision, what each
  activation-checkpointing mode recomputes;
* :mod:`~lightning_tp.planner.errors`: :class:`PlannerError`;
* :mod:`~lightning_tp.planner.checkpoint`: the ``checkpoint=`` input, a Hugging Face config's model
  on the meta device and the plan ``plan="auto"`` gives it;
* :mod:`~lightning_tp.planner.grid`: 2D tensor parallelism's rules (:func:`grid_problems`) and
  per-layer collectives (:func:`layer_terms`);
* :mod:`~lightning_tp.planner.inputs`: :class:`PlanInputs`, :class:`Lora`, the Hydra schema
  :class:`PlanConfig`, :func:`compose_inputs`;
* :mod:`~lightning_tp.planner.layout`: the meta model (a preset's native Llama or a checkpoint's),
  :class:`ParamShard`, :func:`param_shards`, the LoRA adapters (:class:`Adapter`,
  :func:`adapters`);
* :mod:`~lightning_tp.planner.memory`: :func:`layer_activation_bytes`, the per-rank memory;
* :mod:`~lightning_tp.planner.communication`: :class:`Collective`, :func:`collectives`;
* :mod:`~lightning_tp.planner.crossover`: 2D against 1D (:func:`compare_2d`,
  :func:`choose_grid`);
* :mod:`~lightning_tp.planner.estimate`: :class:`Estimate`, the step time;
* :mod:`~lightning_tp.planner.waste`: :class:`Waste`, ``waste``, :func:`least_waste` (heads and
  vocabularies tp does not divide);
* :mod:`~lightning_tp.planner.report`: :class:`PlanReport`, :func:`analyze`, :func:`recommend`,
  the verdict;
* :mod:`~lightning_tp.planner.text`: :func:`format_report`;
* :mod:`~lightning_tp.planner.cli`: ``lightning-tp plan`` (:func:`main`).

This package re-exports the public names of those modules.
"""

from lightning_tp.config import AC_MODES, PRECISIONS
from lightning_tp.planner.cli import USAGE, main
from lightning_tp.planner.communication import Collective, collectives
from lightning_tp.planner.crossover import GridComparison, choose_grid, compare_2d, compare_grid
from lightning_tp.planner.estimate import Estimate
from lightning_tp.planner.grid import grid_problems, layer_terms
from lightning_tp.planner.inputs import Lora, PlanConfig, PlanInputs, PlannerError, compose_inputs
from lightning_tp.planner.layout import Adapter, ParamShard, adapters, param_shards
from lightning_tp.planner.memory import layer_activation_bytes
from lightning_tp.planner.report import Candidate, PlanReport, analyze, recommend
from lightning_tp.planner.text import format_crossover, format_report
from lightning_tp.planner.waste import Waste, least_waste

__all__ = [
    "AC_MODES",
    "PRECISIONS",
    "USAGE",
    "Adapter",
    "Candidate",
    "Collective",
    "Estimate",
    "GridComparison",
    "Lora",
    "ParamShard",
    "PlanConfig",
    "PlanInputs",
    "PlanReport",
    "PlannerError",
    "Waste",
    "adapters",
    "analyze",
    "choose_grid",
    "collectives",
    "compare_2d",
    "compare_grid",
    "compose_inputs",
    "format_crossover",
    "format_report",
    "grid_problems",
    "layer_activation_bytes",
    "layer_terms",
    "least_waste",
    "main",
    "param_shards",
    "recommend",
]
