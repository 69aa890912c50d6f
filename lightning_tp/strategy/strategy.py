"""``TensorParallelStrategy``: Megatron-style tensor parallelism for Lightning as a one-line change.

    trainer = L.Trainer(devices=8, strategy=TensorParallelStrategy())

The strategy builds a (data_parallel × tensor_parallel) mesh, TP inside a node and FSDP2 across
nodes, and in ``setup`` shards the LightningModule's model with a plan (TP → FSDP2 → materialise).
The user writes no parallelisation code.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import types
from collections.abc import Generator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_tp.errors import (
    ConfigureModelRequiredError,
    MeshConfigError,
    ModelNotRecognisedError,
    PlanError,
    PrecisionConfigError,
    SequenceLengthError,
    UnsupportedFeatureError,
    UnsupportedModuleError,
)
from lightning_tp.parallel.apply import (
    apply_fsdp,
    apply_tensor_parallel,
    check_model_shapes,
    clip_grad_norm_,
    materialize,
)
from lightning_tp.parallel.plans import PlanSpec, ResolvedPlan, resolve_plan
from lightning_tp.parallel.recompute import AC_MODES, apply_activation_checkpointing, compile_blocks
from lightning_tp.strategy.checkpoint_io import AtomicCheckpointMixin

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["TensorParallelStrategy"]

_Size = Union[Literal["auto"], int]
_SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "bf16-true", "16-true")


class TensorParallelStrategy(AtomicCheckpointMixin, ModelParallelStrategy):
    """Tensor, sequence and loss parallelism on a 2D mesh with FSDP2, applied for you.

    Args:
        tensor_parallel_size: Devices per tensor-parallel group. ``"auto"``: the devices of one node
            (or ``world_size // data_parallel_size`` when that is given), so TP stays on the fast link.
        data_parallel_size: Number of data-parallel (FSDP2) replicas. ``"auto"``: the number of nodes
            (or ``world_size // tensor_parallel_size`` when that is given).
        plan: ``"auto"`` (recognise a Llama-family model inside the LightningModule; a model that
            ``configure_model()`` already parallelized, with DTensor parameters or FSDP2 modules, is left as it
            is), a registered plan name (see :data:`lightning_tp.parallel.plans.PLANS`), a dict
            ``{module glob: ParallelStyle}`` relative to the LightningModule, a callable
            ``(*, sequence_parallel, loss_parallel) -> dict``, or ``None``: no plan, you parallelize in
            ``configure_model()`` exactly as with ``ModelParallelStrategy`` (its errors included), keeping this
            strategy's mesh-aware clipping, loss-parallel scoping, accumulation without FSDP2 syncs, safe
            checkpoints, launchers and failure reports.
        sequence_parallel: Shard norms and residual activations over the sequence between TP regions:
            same bytes moved as TP alone, activation memory divided by ``tp``.
        loss_parallel: Keep logits vocab-sharded and compute ``F.cross_entropy`` on the shards; the full
            logits are never gathered. User code still calls ``F.cross_entropy`` as usual.
        fsdp: Shard parameters, gradients and optimizer state over the data-parallel mesh with FSDP2
            (per decoder block, then the rest). Also at ``data_parallel_size=1``, where it applies the
            Trainer's mixed precision (``bf16-mixed`` → bf16 compute, fp32 gradient reduction).
            ``False`` is allowed only with ``data_parallel_size=1``.
        reshard_after_forward: FSDP2 frees gathered parameters after forward (less memory, one more
            all-gather in backward).
        save_distributed_checkpoint, process_group_backend: as in ``ModelParallelStrategy``.
        timeout: How long a collective waits for the other ranks before it fails (a ``timedelta`` or seconds;
            default 10 minutes, PyTorch's NCCL default). It bounds how long the job hangs when one rank stops
            without exiting; it also bounds start-up (waiting for every rank to join) and each checkpoint save.
        activation_checkpointing: ``"none"``; ``"full"`` keeps only each decoder block's input and recomputes the
            block in backward; ``"selective"`` keeps sharded matmul and attention outputs and recomputes norms,
            RoPE, element-wise ops and all-gathers (see :mod:`lightning_tp.parallel.recompute`). Parameter
            names and checkpoints are the same in every mode.
        compile: ``torch.compile`` each decoder block's forward (after checkpointing, before FSDP2).
        async_tp: overlap TP collectives with matmuls (symmetric-memory micro-pipelining); needs CUDA,
            ``compile=True`` and ``tensor_parallel_size > 1``. Refused elsewhere.
        float8: train the decoder blocks' linear layers in float8 with torchao; needs torchao, a CUDA device
            of compute capability 8.9 or newer, and ``tensor_parallel_size=1``. Refused elsewhere.
        launcher: ``"subprocess"`` re-runs the script for the other ranks; ``"fork"`` forks them from this process
            and brings the trained weights back as full tensors (Jupyter, Lightning Studio notebooks);
            ``"auto"``: fork in an interactive session, subprocess otherwise.
    """

    strategy_name = "tensor_parallel"

    def __init__(
        self,
        tensor_parallel_size: _Size = "auto",
        data_parallel_size: _Size = "auto",
        plan: Optional[PlanSpec] = "auto",
        sequence_parallel: bool = True,
        loss_parallel: bool = True,
        fsdp: bool = True,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Union[timedelta, float, None] = timedelta(minutes=10),
        launcher: Literal["auto", "subprocess", "fork"] = "auto",
        activation_checkpointing: Literal["none", "full", "selective"] = "none",
        compile: bool = False,
        async_tp: bool = False,
        float8: bool = False,
    ) -> None:
        problems = []
        for name, value in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append(f"`{name}` must be 'auto' or a positive int, got {value!r} (fix: pass e.g. 2, or"
                                " 'auto')")
        for name, value in (("sequence_parallel", sequence_parallel), ("loss_parallel", loss_parallel),
                            ("fsdp", fsdp), ("reshard_after_forward", reshard_after_forward),
                            ("compile", compile), ("async_tp", async_tp), ("float8", float8)):
            if not isinstance(value, bool):
                problems.append(f"`{name}` must be a bool, got {value!r} (fix: pass True or False)")
        if activation_checkpointing not in AC_MODES:
            problems.append(f"`activation_checkpointing` must be one of {', '.join(map(repr, AC_MODES))}, got"
                            f" {activation_checkpointing!r}")
        if async_tp is True and compile is False:
            problems.append("`async_tp=True` needs `compile=True`: the collective/matmul overlap is done by the"
                            " compiler; set compile=True or async_tp=False")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = timedelta(seconds=timeout)
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
            problems.append(f"`timeout` must be a positive number of seconds or a timedelta, got {timeout!r} (fix:"
                            " e.g. timeout=600)")
        if launcher not in ("auto", "subprocess", "fork"):
            problems.append(f"`launcher` must be 'auto', 'subprocess' or 'fork', got {launcher!r}")
        if not (plan is None or isinstance(plan, (str, Mapping)) or callable(plan)):
            problems.append(f"`plan` must be 'auto', a plan name, a dict, a callable or None, got {plan!r}")
        if not fsdp and isinstance(data_parallel_size, int) and data_parallel_size > 1:
            problems.append(f"`fsdp=False` needs `data_parallel_size=1` (got {data_parallel_size}): gradients of"
                            " data-parallel replicas are synchronised by FSDP2; set fsdp=True")
        if problems:
            raise MeshConfigError(f"Invalid {type(self).__name__} arguments: " + "; ".join(problems) + ".")
        if plan is None:
            _refuse_plan_features(activation_checkpointing=activation_checkpointing, compile=compile,
                                  async_tp=async_tp, float8=float8, why="`plan=None` (you parallelize in"
                                  " `configure_model()`)")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plan = plan
        self.sequence_parallel = sequence_parallel
        self.loss_parallel = loss_parallel
        self.fsdp = fsdp
        self.reshard_after_forward = reshard_after_forward
        self.launcher_kind = launcher
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile
        self.async_tp = async_tp
        self.float8 = float8
        self._resolved_plan: Optional[ResolvedPlan] = None
        # "plan": the strategy applied its plan; "user": configure_model() parallelized the model (or plan=None)
        self._parallelized_by: Optional[Literal["plan", "user"]] = None

    # ------------------------------------------------------------------ sizes, checked before any spawn

    def resolved_sizes(self) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)`` for the current devices; raises on a mismatch."""
        per_node = self.num_processes
        world = per_node * self.num_nodes
        dp, tp = self._data_parallel_size, self._tensor_parallel_size
        if dp == "auto" and tp == "auto":
            dp, tp = self.num_nodes, per_node
        elif dp == "auto":
            dp = world // tp if world % tp == 0 else 0
        elif tp == "auto":
            tp = world // dp if world % dp == 0 else 0
        if not dp or not tp or dp * tp != world:
            raise MeshConfigError(
                f"data_parallel_size ({self._data_parallel_size}) and tensor_parallel_size"
                f" ({self._tensor_parallel_size}) multiplied should equal the world size {world}"
                f" (num_nodes={self.num_nodes} × devices={per_node}). Fix: choose sizes whose product is {world},"
                " or leave one of them 'auto'."
            )
        if not self.fsdp and dp > 1:
            raise MeshConfigError(f"`fsdp=False` needs data_parallel_size=1, but {world} devices give {dp}; set"
                                  " fsdp=True or tensor_parallel_size to the world size.")
        return dp, tp

    @override
    def _configure_launcher(self) -> None:
        # The Trainer calls this in the launching process once devices and nodes are known: the earliest
        # point to reject a bad mesh, before any process is spawned.
        self._data_parallel_size, self._tensor_parallel_size = self.resolved_sizes()
        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        if precision not in _SUPPORTED_PRECISION:
            raise PrecisionConfigError(
                f"{type(self).__name__} does not support `Trainer(precision={precision!r})`. Choose one of"
                f" {', '.join(_SUPPORTED_PRECISION)}; 'bf16-mixed' computes in bf16 and reduces gradients in fp32."
            )
        self.check_features()
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:
            return
        from lightning.fabric.utilities.imports import _IS_INTERACTIVE

        from lightning_tp.launch import ForkLauncher, ScriptLauncher

        if self.launcher_kind == "fork" or (self.launcher_kind == "auto" and _IS_INTERACTIVE):
            self._launcher = ForkLauncher(self)
        else:
            self._launcher = ScriptLauncher(self, self.cluster_environment, self.num_processes, self.num_nodes)

    def check_features(self) -> None:
        """Refuse opt-in features (async TP, float8) this accelerator and installation cannot run."""
        device = self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")
        tp = self._tensor_parallel_size
        if self.async_tp:
            if device.type != "cuda":
                raise UnsupportedFeatureError(
                    f"async_tp=True needs CUDA devices (symmetric memory), but this run uses {device.type!r}."
                    " Fix: set async_tp=False on this machine.")
            if tp == 1:
                raise UnsupportedFeatureError("async_tp=True overlaps tensor-parallel collectives, but"
                                              " tensor_parallel_size=1 has none. Fix: set async_tp=False.")
            if not hasattr(torch.distributed, "_symmetric_memory"):
                raise UnsupportedFeatureError(f"async_tp=True needs torch.distributed._symmetric_memory, missing"
                                              f" in torch {torch.__version__}. Fix: set async_tp=False.")
        if self.float8:
            import importlib.util

            if device.type != "cuda":
                raise UnsupportedFeatureError(
                    f"float8=True needs a CUDA device of compute capability 8.9 or newer, but this run uses"
                    f" {device.type!r}. Fix: set float8=False on this machine.")
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 9):
                raise UnsupportedFeatureError(
                    f"float8=True needs compute capability 8.9 or newer (H100, L40, RTX 4090); this device has"
                    f" {capability[0]}.{capability[1]}. Fix: set float8=False.")
            if importlib.util.find_spec("torchao") is None:
                raise UnsupportedFeatureError("float8=True trains with torchao's float8 linear layers, and torchao is"
                                              " not installed. Fix: `pip install torchao`, or set float8=False.")
            if tp != 1:
                raise UnsupportedFeatureError(
                    f"float8=True is supported with tensor_parallel_size=1 (float8 linears + FSDP2), got"
                    f" tensor_parallel_size={tp}. Fix: set tensor_parallel_size=1, or float8=False.")

    def receive_weights(self, module: nn.Module, state: dict[str, Tensor]) -> None:
        """Put the full weights gathered from the ranks into the launching process's (unsharded) ``module``.

        A module built on the meta device gets storage and its buffers first (``init_weights``), then every
        parameter is overwritten with the trained values.
        """
        if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
            if self.plan is not None and _has_parameters(module):
                materialize(module, self._resolve(module), torch.device("cpu"), getattr(module, "init_seed", None))
            else:  # the user's own parallelization: storage only, the trained values follow
                module.to_empty(device="cpu")
        missing, unexpected = module.load_state_dict(state, strict=False)
        lost = sorted({n for n, _ in module.named_parameters()} & set(missing))
        if lost or unexpected:
            raise RuntimeError(f"Trained weights do not fit the launching process's module: missing {lost},"
                               f" unexpected {sorted(unexpected)}.")

    def preflight(self, module: pl.LightningModule) -> None:
        """In the launching process: check the plan and model shapes if the model already exists (built in
        ``__init__``), and that a model no plan applies to is parallelized in ``configure_model()``."""
        _reject_fsdp1(module, type(self).__name__)
        user_hook = is_overridden("configure_model", module)
        if self.plan is None:
            if not user_hook:
                raise ConfigureModelRequiredError(_configure_model_required(type(self).__name__))
            return
        if not _has_parameters(module):
            if not user_hook:
                raise ConfigureModelRequiredError(_no_plan_found(type(self).__name__, module, self.plan, user_hook))
            return  # built in configure_model: checked in setup, identically on every rank
        try:
            self._resolve(module)
        except ModelNotRecognisedError as error:
            if user_hook:
                return  # configure_model() may parallelize it: decided in setup, after the hook ran
            raise ConfigureModelRequiredError(_no_plan_found(type(self).__name__, module, self.plan,
                                                             user_hook)) from error

    def _resolve(self, module: nn.Module) -> ResolvedPlan:
        plan = resolve_plan(module, self.plan, sequence_parallel=self.sequence_parallel,
                            loss_parallel=self.loss_parallel)
        check_model_shapes(module, plan, int(self._tensor_parallel_size))
        return plan

    @override
    def setup_environment(self) -> None:
        # "auto" sizes resolved (and a bad mesh refused) first; then the parent's order: the accelerator's device
        # setup (`torch.cuda.set_device(root_device)`), the process group, the mesh, the mesh on the module.
        self._data_parallel_size, self._tensor_parallel_size = self.resolved_sizes()
        _ignore_lightning_leafspec_warning()
        super().setup_environment()

    @property
    def tensor_parallel_size(self) -> int:
        """The TP degree: from the mesh on a rank, from the resolved configuration in a launching process."""
        if self._device_mesh is None:
            return int(self.resolved_sizes()[1])
        return int(self.device_mesh["tensor_parallel"].size())

    @property
    def data_parallel_size(self) -> int:
        if self._device_mesh is None:
            return int(self.resolved_sizes()[0])
        return int(self.device_mesh["data_parallel"].size())

    # ------------------------------------------------------------------ parallelisation

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        first_setup = self._parallelized_by is None  # validate/test after fit set up the same module again
        if first_setup:
            self._parallelized_by = self._who_parallelizes(self.model)
        if self._parallelized_by == "user":
            super().setup(trainer)  # the parent's: its checks, meta materialisation, precision, optimizers
            self._install_gradient_clipping()
            return
        self.accelerator.setup(trainer)
        module = self.model
        if first_setup:
            assert self._resolved_plan is not None
            seed = getattr(module, "init_seed", None)
            if self.root_device.type == "cpu":
                # DTensor's random ops are coordinated across ranks only on accelerators; on CPU every shard
                # would draw the same numbers (duplicate heads and rows that never become different). So on
                # CPU the full model is initialised identically on every rank and then sharded; on GPUs it is
                # sharded on the meta device and each rank initialises only its shards.
                materialize(module, self._resolved_plan, self.root_device, seed)
            # true-precision dtypes are set before sharding so FSDP2 shards the final dtype
            self.precision_plugin.convert_module(module)
            if self.float8:
                _convert_to_float8(module, self._resolved_plan)
            if self.tensor_parallel_size > 1:
                apply_tensor_parallel(module, self._resolved_plan, self.device_mesh["tensor_parallel"])
            apply_activation_checkpointing(module, self._resolved_plan, self.activation_checkpointing)
            if self.async_tp:
                _enable_async_tp(self.device_mesh["tensor_parallel"])
            if self.compile:
                compile_blocks(module, self._resolved_plan)
            if self.fsdp:
                apply_fsdp(module, self._resolved_plan, self.device_mesh["data_parallel"], self._mp_policy(),
                           self.reshard_after_forward)
            materialize(module, self._resolved_plan, self.root_device, seed)
            self._install_sequence_check(module)
            self.model_to_device()
            self._install_gradient_clipping()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            from lightning.fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)

    def _who_parallelizes(self, module: nn.Module) -> Literal["plan", "user"]:
        """On every rank, after ``configure_model()``: apply the plan, or leave the parallelization to the user.

        ``plan=None`` and (under ``"auto"``) a model that already holds DTensor parameters or FSDP2 modules are
        the user's: no plan is applied to them, ever. A model with no parameters has nothing to shard and is
        the user's too (the parent's behaviour). Anything else gets the plan, or the plan's typed error.
        """
        _reject_fsdp1(module, type(self).__name__)
        if self.plan is None:
            return "user"
        dtensors, fsdp_units = _user_parallelism(module)
        name = type(self).__name__
        if dtensors or fsdp_units:
            if self.plan != "auto":
                raise PlanError(f"configure_model() already parallelized the model ({dtensors} DTensor parameters,"
                                f" {fsdp_units} FSDP2 modules), and plan={self.plan!r} would shard it a second time."
                                " Fix: pass plan=None (or 'auto'), or remove the parallelization from"
                                " configure_model().")
            _refuse_plan_features(activation_checkpointing=self.activation_checkpointing, compile=self.compile,
                                  async_tp=self.async_tp, float8=self.float8,
                                  why="a model that `configure_model()` parallelized itself")
            if not fsdp_units and self.data_parallel_size > 1:
                raise MeshConfigError(
                    f"configure_model() applied tensor parallelism ({dtensors} DTensor parameters) but no FSDP2 while"
                    f" data_parallel_size={self.data_parallel_size}: the data-parallel replicas would never average"
                    " their gradients. Fix: call `fully_shard(..., mesh=self.device_mesh['data_parallel'])` in"
                    " configure_model(), or set data_parallel_size=1, or let the strategy do both (plan='auto' on a"
                    " model it recognises, with no parallelization in configure_model()).")
            rank_zero_info(f"{name}: configure_model() parallelized the model itself ({dtensors} DTensor"
                           f" parameters, {fsdp_units} FSDP2 modules); no plan is applied to it.")
            return "user"
        if not _has_parameters(module):
            return "user"
        try:
            self._resolved_plan = self._resolve(module)
        except ModelNotRecognisedError as error:
            user_hook = is_overridden("configure_model", module)
            cls = ModelNotRecognisedError if user_hook else ConfigureModelRequiredError
            raise cls(_no_plan_found(name, module, self.plan, user_hook)) from error
        return "plan"

    def _mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        if precision == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def _install_gradient_clipping(self) -> None:
        # Lightning clips through the precision plugin with torch's clip_grad_norm_, which stacks per-parameter
        # norms and fails once parameters sit on different meshes. Swap in a mesh-aware version.
        plugin = self.precision_plugin

        def clip_grad_by_norm(_self: Any, optimizer: Any, clip_val: float) -> None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            clip_grad_norm_(params, clip_val)

        def clip_grad_by_value(_self: Any, optimizer: Any, clip_val: float) -> None:
            from torch.distributed.tensor import DTensor

            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                        g.clamp_(-clip_val, clip_val)

        plugin.clip_grad_by_norm = types.MethodType(clip_grad_by_norm, plugin)
        plugin.clip_grad_by_value = types.MethodType(clip_grad_by_value, plugin)

    # ------------------------------------------------------------------ steps: loss parallel, SP checks

    def _install_sequence_check(self, module: nn.Module) -> None:
        """Under SP, reject a sequence length the TP ranks cannot split, at the model's input, on every rank."""
        tp = self.tensor_parallel_size
        if not self.sequence_parallel or tp == 1:
            return

        def check(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = args[0] if args else kwargs.get("input_ids")
            if isinstance(ids, Tensor) and ids.ndim >= 2 and ids.shape[1] % tp != 0:
                raise SequenceLengthError(
                    f"Sequence length {ids.shape[1]} is not divisible by tensor_parallel_size={tp}, which sequence"
                    f" parallelism requires. Fix: pad or pack sequences to a multiple of {tp}, or pass"
                    " sequence_parallel=False."
                )

        assert self._resolved_plan is not None
        for path in self._resolved_plan.roots:
            module.get_submodule(path).register_forward_pre_hook(check, with_kwargs=True, prepend=True)

    @contextlib.contextmanager
    def _loss_context(self) -> Generator[None, None, None]:
        if not self.loss_parallel or self.tensor_parallel_size == 1:
            yield
            return
        with _vocab_parallel_cross_entropy():
            yield

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return _to_local(super().training_step(*args, **kwargs))

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return _to_local(super().validation_step(*args, **kwargs))

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return _to_local(super().test_step(*args, **kwargs))

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        # The backward of a vocab-parallel cross entropy must run under the same context as its forward.
        if self.loss_parallel and self.tensor_parallel_size > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel():
                return super().backward(closure_loss, optimizer, *args, **kwargs)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Tell the launching process why this rank failed, so its report quotes the original error.
        super().on_exception(exception)
        from lightning_tp.launch import record_failure

        record_failure(self.global_rank, exception)

    @contextlib.contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Skip FSDP2 gradient reduce-scatter on non-final micro-batches of gradient accumulation."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)] if self.model is not None else []
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
            "tensor_parallel": ({}, "TP + sequence parallel + loss parallel, FSDP2 across data-parallel replicas"),
            "tensor_parallel_no_sp": ({"sequence_parallel": False}, "TP + loss parallel, no sequence parallel"),
            "tensor_parallel_no_loss_parallel": ({"loss_parallel": False}, "TP + SP, full logits gathered"),
            "tensor_parallel_tp_only": ({"sequence_parallel": False, "loss_parallel": False}, "plain Megatron TP"),
        }
        for name, (flags, description) in variants.items():
            strategy_registry.register(name, cls, description=f"{cls.__name__}: {description}", override=True,
                                       **flags)


def _convert_to_float8(module: nn.Module, plan: ResolvedPlan) -> None:
    """Swap the decoder blocks' ``nn.Linear`` layers for torchao float8 training linears (GPU only)."""
    from torchao.float8 import convert_to_float8_training

    for path in plan.blocks:
        convert_to_float8_training(module.get_submodule(path),
                                   module_filter_fn=lambda m, _: m.in_features % 16 == 0 and m.out_features % 16 == 0)


def _enable_async_tp(tp_mesh: Any) -> None:
    """Let the compiler fuse TP all-gathers/reduce-scatters with the neighbouring matmuls (GPU only)."""
    from torch._inductor import config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def _ignore_lightning_leafspec_warning() -> None:
    """Lightning 2.6's ``CombinedLoader`` builds ``torch.utils._pytree.LeafSpec()``, which torch 2.13 deprecates: a
    FutureWarning once per rank on every fit, from Lightning's own code, harmless, and nothing a user can act on.
    Only that message is filtered, on the ranks this strategy runs (set up here, before any data loader exists)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def _reject_fsdp1(module: nn.Module, owner: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return
    wrapped = [n or type(module).__name__ for n, m in module.named_modules() if isinstance(m, FullyShardedDataParallel)]
    raise UnsupportedModuleError(
        f"Found modules that are wrapped with `torch.distributed.fsdp.FullyShardedDataParallel` (FSDP1):"
        f" {wrapped or 'some of its modules'}. The `{owner}` only supports the new FSDP2 APIs in PyTorch >= 2.4."
        f" Fix: remove the wrapper and pass the plain model ({owner} applies FSDP2 after tensor parallelism), or"
        " call `fully_shard` (FSDP2) yourself in configure_model() with plan=None."
    )


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _user_parallelism(module: nn.Module) -> tuple[int, int]:
    """How many DTensor parameters and FSDP2 modules ``module`` holds: the marks of a user's own parallelization."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    dtensors = sum(isinstance(p, DTensor) for p in module.parameters())
    return dtensors, sum(isinstance(m, FSDPModule) for m in module.modules())


def _configure_model_required(owner: str) -> str:
    return (f"When using the {owner} with plan=None, you are required to override the `configure_model()` hook in"
            " the LightningModule and apply parallelization there (as with ModelParallelStrategy). Fix: add"
            " configure_model(), or use plan='auto' for a Llama-family model the strategy shards for you.")


def _no_plan_found(owner: str, module: nn.Module, plan: Any, user_hook: bool) -> str:
    what = (f"plan={plan!r} found no model it recognises in {type(module).__name__}: it looks for a Llama-family"
            " causal LM (`model.layers[i].self_attn`, `.mlp`, `lm_head`, as in lightning_tp.models.Llama or"
            " transformers' LlamaForCausalLM), and configure_model() did not parallelize it (no DTensor parameters,"
            " no FSDP2 modules).")
    if user_hook:
        return (f"{what} Fix: pass plan=None to keep ModelParallelStrategy's behaviour (the model is trained as"
                " configure_model() left it), parallelize it in configure_model() with `self.device_mesh`, or pass"
                " `plan=` a dict {module glob: ParallelStyle} or a callable.")
    return (f"{what} Fix: pass `plan=` a dict {{module glob: ParallelStyle}} or a callable, or pass plan=None: then,"
            f" as with ModelParallelStrategy, you are required to override the `configure_model()` hook in the"
            f" LightningModule and apply parallelization there ({owner} keeps its clipping, loss parallel and"
            " checkpoints).")


def _refuse_plan_features(*, activation_checkpointing: str, compile: bool, async_tp: bool, float8: bool,
                          why: str) -> None:
    """Options that act on the decoder blocks the strategy's own plan finds cannot apply to a user's parallelization."""
    asked = [f"{name}={value!r}" for name, value, off in (
        ("activation_checkpointing", activation_checkpointing, "none"), ("compile", compile, False),
        ("async_tp", async_tp, False), ("float8", float8, False)) if value != off]
    if asked:
        raise UnsupportedFeatureError(
            f"{', '.join(asked)} act on the decoder blocks found by the strategy's own plan, which does not apply to"
            f" {why}. Fix: leave them at their defaults and apply them yourself in configure_model() (e.g."
            " `torch.compile`, `checkpoint_wrapper` per block), or let the strategy parallelize the model"
            " (plan='auto', nothing parallelized in configure_model()).")


def _to_local(output: Any) -> Any:
    """Turn a replicated DTensor loss (and DTensors in a returned dict) into plain tensors; differentiable."""
    from torch.distributed.tensor import DTensor

    if isinstance(output, DTensor):
        return output.full_tensor() if any(p.is_partial() for p in output.placements) else output.to_local()
    if isinstance(output, Mapping):
        return {k: _to_local(v) for k, v in output.items()}
    return output


@contextlib.contextmanager
def _vocab_parallel_cross_entropy() -> Generator[None, None, None]:
    """Route ``F.cross_entropy`` on class-sharded DTensor logits through ``loss_parallel()``.

    The context covers exactly the cross-entropy call (not the whole step), so any other use of the
    sharded logits keeps DTensor's ordinary semantics, and the loss comes back as a plain tensor that
    Lightning can log and reduce.
    """
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    original = F.cross_entropy

    @functools.wraps(original)
    def cross_entropy(input: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not isinstance(input, DTensor):
            return original(input, target, *args, **kwargs)
        with loss_parallel():
            return _to_local(original(input, target, *args, **kwargs))

    F.cross_entropy = cross_entropy
    try:
        yield
    finally:
        F.cross_entropy = original
