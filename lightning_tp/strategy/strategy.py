"""``TensorParallelStrategy``: Megatron-style tensor parallelism for Lightning as a one-line change.

    trainer = L.Trainer(devices=8, strategy=TensorParallelStrategy())

The strategy builds a (data_parallel × tensor_parallel) mesh, TP inside a node and FSDP2 across
nodes, and in ``setup`` shards the LightningModule's model with a plan
(:func:`lightning_tp.parallel.parallelize.parallelize`). The user writes no parallelisation code.
This module holds the Lightning plumbing only: arguments, launch, setup order, steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Generator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel
from typing_extensions import override

from lightning_tp import _compat
from lightning_tp.config import (
    LAUNCHERS,
    ActivationCheckpointing,
    Launcher,
    ParallelConfig,
    Size,
    check_precision,
    split_grid,
)
from lightning_tp.errors import (
    ConfigureModelRequiredError,
    MeshConfigError,
    ModelNotRecognisedError,
    PlanError,
)
from lightning_tp.launch import ForkLauncher, ScriptLauncher, record_failure
from lightning_tp.launch.preflight import check_features
from lightning_tp.parallel.dtensor import full_outputs
from lightning_tp.parallel.fsdp import mixed_precision_policy
from lightning_tp.parallel.grid import tp_mesh_of
from lightning_tp.parallel.lora import adapt_styles
from lightning_tp.parallel.ownership import (
    has_parameters,
    no_plan_found,
    refuse_plan_features,
    reject_fsdp1,
    user_parallelism,
)
from lightning_tp.parallel.parallelize import parallelize
from lightning_tp.parallel.plans import PlanSpec, ResolvedPlan, resolve_plan
from lightning_tp.parallel.shapes import check_model_shapes
from lightning_tp.strategy.checkpoint_io import AtomicCheckpointMixin
from lightning_tp.strategy.loss_parallel import VocabParallelCrossEntropy
from lightning_tp.strategy.precision import with_mesh_clipping

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["TensorParallelStrategy"]


class TensorParallelStrategy(AtomicCheckpointMixin, ModelParallelStrategy):
    """Tensor, sequence and loss parallelism on a 2D mesh with FSDP2, applied for you.

    Args:
        tensor_parallel_size: Devices per tensor-parallel group. ``"auto"``: the devices of one node
            (or ``world_size // data_parallel_size`` when that is given), so TP stays on the fast
            link. A pair ``(r, c)``: 2D tensor parallelism over ``r·c`` devices as an ``r × c``
            grid, each decoder projection split on both dimensions (Llama, Mistral and Qwen2
            models; :mod:`lightning_tp.parallel.grid`, docs/2d.md says when it moves fewer bytes
            than 1D). Not with ``sequence_parallel=False``, ``save_sharded_inputs``, ``compile``,
            ``async_tp``, ``float8``, ``activation_checkpointing="selective"`` or LoRA.
        data_parallel_size: Number of data-parallel (FSDP2) replicas. ``"auto"``: the number of
            nodes (or ``world_size // tensor_parallel_size`` when that is given).
        plan: ``"auto"`` (recognise a Llama-family model inside the LightningModule; a model that
            ``configure_model()`` already parallelized, with DTensor parameters or FSDP2 modules, is
            left as it is), a registered plan name (see :data:`lightning_tp.parallel.plans.PLANS`),
            a dict ``{module glob: ParallelStyle}`` relative to the LightningModule, a callable
            ``(*, sequence_parallel, loss_parallel) -> dict``, or ``None``: no plan, you parallelize
            in ``configure_model()`` exactly as with ``ModelParallelStrategy`` (its errors
            included), keeping this strategy's mesh-aware clipping, loss-parallel scoping,
            accumulation without FSDP2 syncs, safe checkpoints, launchers and failure reports.
        sequence_parallel: Shard norms and residual activations over the sequence between TP
            regions: same bytes moved as TP alone, activation memory divided by ``tp``.
        loss_parallel: Keep logits vocab-sharded and compute ``F.cross_entropy`` on the shards; the
            full logits are never gathered. User code still calls ``F.cross_entropy`` as usual.
        fsdp: Shard parameters, gradients and optimizer state over the data-parallel mesh with FSDP2
            (per decoder block, then the rest). Also at ``data_parallel_size=1``, where it applies
            the Trainer's mixed precision (``bf16-mixed`` → bf16 compute, fp32 gradient reduction).
            ``False`` is allowed only with ``data_parallel_size=1``.
        reshard_after_forward: FSDP2 frees gathered parameters after forward (less memory, one more
            all-gather in backward).
        save_distributed_checkpoint, process_group_backend: as in ``ModelParallelStrategy``.
        timeout: How long a collective waits for the other ranks before it fails (a ``timedelta`` or
            seconds; default 10 minutes, PyTorch's NCCL default). It bounds how long the job hangs
            when one rank stops without exiting; it also bounds start-up (waiting for every rank to
            join) and each checkpoint save.
        activation_checkpointing: ``"none"``; ``"full"`` keeps only each decoder block's input and
            recomputes the block in backward; ``"selective"`` keeps sharded matmul and attention
            outputs and recomputes norms, RoPE, element-wise ops and all-gathers (see
            :mod:`lightning_tp.parallel.recompute`). Parameter names and checkpoints are the same in
            every mode.
        compile: ``torch.compile`` each decoder block's forward (after checkpointing, before FSDP2).
        async_tp: overlap TP collectives with matmuls (symmetric-memory micro-pipelining); needs
            CUDA, ``compile=True`` and ``tensor_parallel_size > 1``. Refused elsewhere.
        float8: train the decoder blocks' linear layers in float8 with torchao; needs torchao, a
            CUDA device of compute capability 8.9 or newer, and ``tensor_parallel_size=1``. Refused
            elsewhere.
        save_sharded_inputs: under sequence parallelism, keep only this rank's sequence shard of
            the two all-gathered inputs of each decoder block (before ``self_attn`` and ``mlp``) for
            backward and all-gather them again there, as Megatron does: ``4·s·b·h·(1 − 1/tp)``
            bytes less per layer in 16 bits, for 2 more all-gathers per layer in backward
            (:mod:`lightning_tp.parallel.sharded_saves`). Needs ``sequence_parallel=True``,
            ``activation_checkpointing="none"`` and ``compile=False``.
        launcher: ``"subprocess"`` re-runs the script for the other ranks; ``"fork"`` forks them
            from this process and brings the trained weights back as full tensors (Jupyter,
            Lightning Studio notebooks); ``"auto"``: fork in an interactive session, subprocess
            otherwise.
    """

    strategy_name = "tensor_parallel"

    def __init__(
        self,
        tensor_parallel_size: Union[Size, tuple[int, int]] = "auto",
        data_parallel_size: Size = "auto",
        plan: Optional[PlanSpec] = "auto",
        sequence_parallel: bool = True,
        loss_parallel: bool = True,
        fsdp: bool = True,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Union[timedelta, float, None] = timedelta(minutes=10),
        launcher: Launcher = "auto",
        activation_checkpointing: ActivationCheckpointing = "none",
        compile: bool = False,
        async_tp: bool = False,
        float8: bool = False,
        save_sharded_inputs: bool = False,
    ) -> None:
        tensor_parallel_size, grid = split_grid(tensor_parallel_size)
        fields = {"tensor_parallel_size": tensor_parallel_size, "grid": grid,
                  "data_parallel_size": data_parallel_size,
                  "sequence_parallel": sequence_parallel, "loss_parallel": loss_parallel,
                  "fsdp": fsdp, "reshard_after_forward": reshard_after_forward,
                  "activation_checkpointing": activation_checkpointing, "compile": compile,
                  "async_tp": async_tp, "float8": float8,
                  "save_sharded_inputs": save_sharded_inputs}
        problems = ParallelConfig.problems(**fields)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = timedelta(seconds=timeout)
        if timeout is not None and (not isinstance(timeout, timedelta)
                                    or timeout.total_seconds() <= 0):
            problems.append(f"`timeout` must be a positive number of seconds or a timedelta, got"
                            f" {timeout!r} (fix: e.g. timeout=600)")
        if launcher not in LAUNCHERS:
            problems.append(f"`launcher` must be 'auto', 'subprocess' or 'fork', got {launcher!r}")
        if not (plan is None or isinstance(plan, (str, Mapping)) or callable(plan)):
            problems.append(f"`plan` must be 'auto', a plan name, a dict, a callable or None, got"
                            f" {plan!r}")
        if problems:
            raise MeshConfigError(f"Invalid {type(self).__name__} arguments: "
                                  + "; ".join(problems) + ".")
        self.parallel = ParallelConfig(**fields)
        """The sizes (``"auto"`` until the devices are known) and modes; see
        :mod:`lightning_tp.config`."""
        if plan is None:
            refuse_plan_features(self.parallel,
                                 "`plan=None` (you parallelize in `configure_model()`)")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plan = plan
        self.launcher_kind = launcher
        self._resolved_plan: Optional[ResolvedPlan] = None
        # "plan": the strategy applied its plan; "user": configure_model() parallelized the model
        self._parallelized_by: Optional[Literal["plan", "user"]] = None

    # The modes, read from the configuration (one owner), under the names of the arguments.
    sequence_parallel = property(lambda self: self.parallel.sequence_parallel)
    loss_parallel = property(lambda self: self.parallel.loss_parallel)
    fsdp = property(lambda self: self.parallel.fsdp)
    reshard_after_forward = property(lambda self: self.parallel.reshard_after_forward)
    activation_checkpointing = property(lambda self: self.parallel.activation_checkpointing)
    compile = property(lambda self: self.parallel.compile)
    async_tp = property(lambda self: self.parallel.async_tp)
    float8 = property(lambda self: self.parallel.float8)
    save_sharded_inputs = property(lambda self: self.parallel.save_sharded_inputs)
    grid = property(lambda self: self.parallel.grid)
    """``(r, c)`` under 2D tensor parallelism, else None."""

    @property
    def sequence_shards(self) -> int:
        """Into how many pieces sequence parallelism splits a sequence (a batch's length must be a
        multiple): the TP size in 1D, the grid's rows in 2D, 1 without SP."""
        if not self.sequence_parallel:
            return 1
        return self.grid[0] if self.grid else self.tensor_parallel_size

    # ------------------------------------------------------------ sizes, checked before any spawn

    def resolved_sizes(self) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)`` for the current devices; raises on a
        mismatch."""
        return self.parallel.resolve(self.num_processes * self.num_nodes, self.num_nodes)

    @override
    def _configure_launcher(self) -> None:
        # The Trainer calls this in the launching process once devices and nodes are known: the
        # earliest point to reject a bad mesh, before any process is spawned.
        self._data_parallel_size, self._tensor_parallel_size = self.resolved_sizes()
        check_precision(str(getattr(self.precision_plugin, "precision", "32-true")),
                        type(self).__name__)
        device = self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")
        check_features(self.parallel, device, int(self._tensor_parallel_size))
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:
            return
        if (self.launcher_kind == "fork"
                or (self.launcher_kind == "auto" and _compat.is_interactive())):
            self._launcher = ForkLauncher(self)
        else:
            self._launcher = ScriptLauncher(self, self.cluster_environment, self.num_processes,
                                            self.num_nodes)

    def resolve(self, module: nn.Module) -> ResolvedPlan:
        """The plan for ``module`` with this strategy's modes, its shapes checked against the TP
        size (raises the plan's or the shape check's typed error)."""
        plan = resolve_plan(module, self.plan, sequence_parallel=self.sequence_parallel,
                            loss_parallel=self.loss_parallel, grid=self.grid)
        check_model_shapes(module, plan, int(self._tensor_parallel_size))  # a grid's vocabulary
        if int(self._tensor_parallel_size) > 1:
            adapt_styles(module, plan.styles)  # PEFT adapters: each must follow a split projection
        return plan

    @override
    def setup_environment(self) -> None:
        # "auto" sizes resolved (and a bad mesh refused) first; then the parent's order: the
        # accelerator's device setup, the process group, the mesh, the mesh on the module.
        self._data_parallel_size, self._tensor_parallel_size = self.resolved_sizes()
        _ignore_lightning_leafspec_warning()
        super().setup_environment()
        if self.grid is not None:  # the TP dim as rows × columns, flattened under its 1D name
            from torch.distributed.device_mesh import init_device_mesh

            rows, cols = self.grid
            mesh = init_device_mesh(self.root_device.type, (self.data_parallel_size, rows, cols),
                                    mesh_dim_names=("data_parallel", "tp_row", "tp_col"))
            mesh["tp_row", "tp_col"]._flatten("tensor_parallel")
            self._device_mesh = mesh
            assert self.lightning_module is not None
            self.lightning_module._device_mesh = mesh

    @property
    def tensor_parallel_size(self) -> int:
        """The TP degree: from the mesh on a rank, from the resolved configuration in a launching
        process."""
        if self._device_mesh is None:
            return int(self.resolved_sizes()[1])
        return int(tp_mesh_of(self.device_mesh).size())

    @property
    def data_parallel_size(self) -> int:
        if self._device_mesh is None:
            return int(self.resolved_sizes()[0])
        return int(self.device_mesh["data_parallel"].size())

    @property
    @override
    def precision_plugin(self) -> Precision:
        return super().precision_plugin

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        # Lightning clips through the precision plugin; give it clipping that works across meshes.
        self._precision_plugin = None if plugin is None else with_mesh_clipping(plugin)

    # ------------------------------------------------------------------------- parallelisation

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        first_setup = self._parallelized_by is None  # validate/test after fit: the same module
        if first_setup:
            self._parallelized_by = self._who_parallelizes(self.model)
        if self._parallelized_by == "user":
            # the parent's: its checks, meta materialisation, precision, optimizers
            super().setup(trainer)
            return
        self.accelerator.setup(trainer)
        if first_setup:
            assert self._resolved_plan is not None
            precision = str(getattr(self.precision_plugin, "precision", "32-true"))
            parallelize(self.model, self._resolved_plan,
                        dataclasses.replace(self.parallel,
                                            tensor_parallel_size=self.tensor_parallel_size,
                                            data_parallel_size=self.data_parallel_size),
                        self.device_mesh, self.root_device,
                        mp_policy=mixed_precision_policy(precision),
                        seed=getattr(self.model, "init_seed", None),
                        convert_dtype=self.precision_plugin.convert_module)
            self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _compat.optimizers_to_device(self.optimizers, self.root_device)

    def _who_parallelizes(self, module: nn.Module) -> Literal["plan", "user"]:
        """On every rank, after ``configure_model()``: apply the plan, or leave the
        parallelization to the user.

        ``plan=None`` and (under ``"auto"``) a model that already holds DTensor parameters or FSDP2
        modules are the user's: no plan is applied to them, ever. A model with no parameters has
        nothing to shard and is the user's too (the parent's behaviour). Anything else gets the
        plan, or the plan's typed error.
        """
        name = type(self).__name__
        reject_fsdp1(module, name)
        if self.plan is None:
            return "user"
        dtensors, fsdp_units = user_parallelism(module)
        if dtensors or fsdp_units:
            if self.plan != "auto":
                raise PlanError(
                    f"configure_model() already parallelized the model ({dtensors} DTensor"
                    f" parameters, {fsdp_units} FSDP2 modules), and plan={self.plan!r} would shard"
                    " it a second time. Fix: pass plan=None (or 'auto'), or remove the"
                    " parallelization from configure_model().")
            refuse_plan_features(self.parallel,
                                 "a model that `configure_model()` parallelized itself")
            if not fsdp_units and self.data_parallel_size > 1:
                raise MeshConfigError(
                    f"configure_model() applied tensor parallelism ({dtensors} DTensor parameters)"
                    f" but no FSDP2 while data_parallel_size={self.data_parallel_size}: the"
                    " data-parallel replicas would never average their gradients. Fix: call"
                    " `fully_shard(..., mesh=self.device_mesh['data_parallel'])` in"
                    " configure_model(), or set data_parallel_size=1, or let the strategy do both"
                    " (plan='auto' on a model it recognises, with no parallelization in"
                    " configure_model()).")
            rank_zero_info(f"{name}: configure_model() parallelized the model itself ({dtensors}"
                           f" DTensor parameters, {fsdp_units} FSDP2 modules); no plan is applied"
                           " to it.")
            return "user"
        if not has_parameters(module):
            return "user"
        try:
            self._resolved_plan = self.resolve(module)
        except ModelNotRecognisedError as error:
            user_hook = is_overridden("configure_model", module)
            cls = ModelNotRecognisedError if user_hook else ConfigureModelRequiredError
            raise cls(no_plan_found(name, module, self.plan, user_hook)) from error
        return "plan"

    # --------------------------------------------------------------------- steps: loss parallel

    def _loss_parallel_active(self) -> bool:
        return self.loss_parallel and self.tensor_parallel_size > 1

    @contextlib.contextmanager
    def _loss_context(self) -> Generator[None, None, None]:
        if not self._loss_parallel_active():
            yield
            return
        with VocabParallelCrossEntropy():
            yield

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return full_outputs(super().training_step(*args, **kwargs))

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return full_outputs(super().validation_step(*args, **kwargs))

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return full_outputs(super().test_step(*args, **kwargs))

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        # The backward of a vocab-parallel cross entropy must run under the same context as its
        # forward.
        if self._loss_parallel_active():
            with loss_parallel():
                return super().backward(closure_loss, optimizer, *args, **kwargs)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Tell the launching process why this rank failed, so its report quotes the original error.
        super().on_exception(exception)
        record_failure(self.global_rank, exception)

    @contextlib.contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Skip FSDP2 gradient reduce-scatter on non-final micro-batches of gradient
        accumulation."""
        units = ([m for m in self.model.modules() if isinstance(m, FSDPModule)]
                 if self.model is not None else [])
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        variants = {
            "tensor_parallel": ({}, "TP + sequence parallel + loss parallel, FSDP2 across"
                                    " data-parallel replicas"),
            "tensor_parallel_no_sp": ({"sequence_parallel": False},
                                      "TP + loss parallel, no sequence parallel"),
            "tensor_parallel_no_loss_parallel": ({"loss_parallel": False},
                                                 "TP + SP, full logits gathered"),
            "tensor_parallel_tp_only": ({"sequence_parallel": False, "loss_parallel": False},
                                        "plain Megatron TP"),
        }
        for name, (flags, description) in variants.items():
            strategy_registry.register(name, cls, description=f"{cls.__name__}: {description}",
                                       override=True, **flags)


def _ignore_lightning_leafspec_warning() -> None:
    """Lightning 2.6's ``CombinedLoader`` builds ``torch.utils._pytree.LeafSpec()``, which torch
    2.13 deprecates: a FutureWarning once per rank on every fit, from Lightning's own code,
    harmless, and nothing a user can act on. Only that message is filtered, on the ranks this
    strategy runs (set up here, before any data loader exists)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
