"""Checks of the machine a job is about to start on, run in the launching process before any rank is
spawned.

A job that asks for more devices than the machine has, or whose rendezvous port is already taken,
otherwise fails late and badly: rank 0 cannot open the process group's store, and the ranks already
started wait for it until the collective timeout (30 minutes by default). These checks turn both
into an immediate :class:`~lightning_tp.errors.EnvironmentConfigError` that names the setting and
the fix.

* :func:`check_devices`: the ``devices`` a recipe asks for against the visible CUDA devices (before
  the Trainer is built, so the message can name the recipe's key) and the number of CPU processes
  against the cores.
* :func:`check_port`: the rendezvous port (``MASTER_PORT``, or the free port Lightning picked) can
  be bound.
* :func:`check_launch`: both, for a launcher about to start its ranks (:mod:`lightning_tp.launch`).
* :func:`check_features`: the opt-in features (async TP, float8) against the device and the
  installation.
* :func:`check_model`: the plan and the model's shapes, when the LightningModule already holds its
  model, and that a model no plan applies to is parallelized in ``configure_model()``.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_tp import _compat
from lightning_tp.config import ParallelConfig
from lightning_tp.errors import (
    ConfigureModelRequiredError,
    EnvironmentConfigError,
    ModelNotRecognisedError,
    UnsupportedFeatureError,
)
from lightning_tp.parallel.ownership import (
    configure_model_required,
    has_parameters,
    no_plan_found,
    reject_fsdp1,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "MAX_CPU_PROCESSES_ENV",
    "LaunchedStrategy",
    "check_devices",
    "check_features",
    "check_launch",
    "check_model",
    "check_port",
    "cpu_process_limit",
]



class LaunchedStrategy(Protocol):
    """What the launch package needs of the strategy it starts (``TensorParallelStrategy``): the
    launch package sits below the strategy and never imports it."""

    plan: Any
    cluster_environment: Any
    num_processes: int
    root_device: torch.device
    global_rank: int

    def resolve(self, module: nn.Module) -> Any:
        """The plan for ``module``, its shapes checked (raises the plan's typed error)."""


MAX_CPU_PROCESSES_ENV = "LIGHTNING_TP_MAX_CPU_PROCESSES"
"""Environment variable that raises (or lowers) :func:`cpu_process_limit`."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_process_limit() -> int:
    """Most CPU processes per node a job may start: 4 per core and at least 8, so that dp=2 × tp=4
    still runs on a laptop; more only oversubscribes the cores (each process also holds a full copy
    of Python and torch)."""
    if os.environ.get(MAX_CPU_PROCESSES_ENV):
        try:
            return int(os.environ[MAX_CPU_PROCESSES_ENV])
        except ValueError:
            raise EnvironmentConfigError(
                f"{MAX_CPU_PROCESSES_ENV}={os.environ[MAX_CPU_PROCESSES_ENV]!r} is not an integer."
                " Fix: set it to the most CPU processes a job may start on this machine, or unset"
                " it."
            ) from None
    return max(8, 4 * _cores())


def _check_cpu_processes(processes: int, name: str) -> None:
    limit = cpu_process_limit()
    if processes > limit:
        raise EnvironmentConfigError(
            f"{name}={processes} would start {processes} CPU processes on this machine's {_cores()}"
            f" core(s); the limit is {limit}. Fix: set {name} to at most {limit} (e.g. {name}=4 for"
            f" dp=2 × tp=2), or set {MAX_CPU_PROCESSES_ENV} to allow more."
        )


def _count(devices: Any, name: str) -> int | None:
    """Processes per node for a ``devices`` value; ``None`` for ``"auto"``; raises for a value of
    the wrong type."""
    if devices == "auto" or devices == -1 or devices == "-1":
        return None
    if isinstance(devices, bool):
        pass
    elif isinstance(devices, int) and devices >= 1:
        return devices
    elif (isinstance(devices, (list, tuple)) and devices
          and all(isinstance(d, int) and d >= 0 for d in devices)):
        return len(devices)
    elif isinstance(devices, str):
        parts = [p.strip() for p in devices.strip().strip(",").split(",")]
        if all(p.isdigit() for p in parts):
            # Lightning reads "3" as three devices and "0,2" (a comma) as the device indices 0 and 2
            return len(parts) if "," in devices else int(parts[0]) or None
    raise EnvironmentConfigError(
        f"{name}={devices!r} is not a device count. Fix: set {name} to 'auto', a positive int (e.g."
        f" {name}=4), or a list of device indices (e.g. {name}=[0,1])."
    )


def check_devices(accelerator: Any, devices: Any, num_nodes: Any = 1, *,
                  name: str = "devices") -> None:
    """Raise :class:`EnvironmentConfigError` if ``devices`` is not a device count, asks for more
    CUDA devices than are visible, or for more CPU processes than :func:`cpu_process_limit`.
    ``name`` is how the caller's user spells the setting (``trainer.devices`` in a recipe)."""
    import torch

    count = _count(devices, name)
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise EnvironmentConfigError(f"num_nodes={num_nodes!r} must be a positive int. Fix: set it"
                                     " to the number of machines the job runs on, e.g."
                                     " num_nodes=1.")
    kind = str(accelerator).lower()
    if kind in ("gpu", "cuda") or (kind == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count()
        wanted = count if not isinstance(devices, (list, tuple)) else max(devices) + 1
        if visible == 0:
            raise EnvironmentConfigError(
                f"accelerator={accelerator!r} needs CUDA devices, but none is visible to this"
                f" process (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Fix:"
                " set accelerator='cpu' (trainer=cpu in a recipe), or run on a machine with GPUs."
            )
        if wanted is not None and wanted > visible:
            raise EnvironmentConfigError(
                f"{name}={devices!r} asks for {wanted} GPUs, but this machine has {visible} visible"
                f" CUDA device(s). Fix: set {name} to at most {visible} (or 'auto' for all of"
                " them), and the strategy sizes to match."
            )
    elif kind == "cpu" or kind == "auto":
        if count is not None:
            _check_cpu_processes(count, name)


def check_port(port: int, name: str = "MASTER_PORT") -> None:
    """Raise :class:`EnvironmentConfigError` if ``port`` cannot be bound on this machine (someone
    listens there)."""
    if not 0 < int(port) < 65536:
        raise EnvironmentConfigError(f"{name}={port} is not a TCP port. Fix: set {name} to a number"
                                     " in 1..65535, or unset it to let Lightning pick a free port.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR, as the process group's store sets it: a port in TIME_WAIT is usable, a
        # listening one is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as free:
                free.bind(("", 0))
                suggestion = free.getsockname()[1]
            reason = ("is already in use on this machine" if e.errno == errno.EADDRINUSE
                      else "needs privileges")
            raise EnvironmentConfigError(
                f"{name}={port} {reason}, so rank 0 cannot start the process group's store there"
                " (another job, or a leftover process of an earlier one, holds it). Fix: unset"
                " MASTER_PORT to let Lightning pick a free port, or set it to a free one (e.g."
                f" MASTER_PORT={suggestion})."
            ) from e


def check_launch(strategy: Any) -> None:
    """For a launcher about to start the ranks of ``strategy`` on this node: the CPU process count
    and, on the node that hosts the rendezvous (node rank 0), the port."""
    env = strategy.cluster_environment
    if env is None or env.creates_processes_externally:
        # torchrun, SLURM, a re-run rank: the processes exist already; whoever started them chose
        # the port
        return
    if getattr(strategy.root_device, "type", None) == "cpu":
        _check_cpu_processes(strategy.num_processes, "devices")
    if env.node_rank() == 0:
        check_port(env.main_port,
                   "MASTER_PORT" if "MASTER_PORT" in os.environ else "the rendezvous port")


def check_features(config: ParallelConfig, device: torch.device, tp: int) -> None:
    """Refuse opt-in features (async TP, float8) that ``device`` and this installation cannot
    run."""
    if config.async_tp:
        if device.type != "cuda":
            raise UnsupportedFeatureError(
                "async_tp=True needs CUDA devices (symmetric memory), but this run uses"
                f" {device.type!r}. Fix: set async_tp=False on this machine.")
        if tp == 1:
            raise UnsupportedFeatureError("async_tp=True overlaps tensor-parallel collectives, but"
                                          " tensor_parallel_size=1 has none. Fix: set"
                                          " async_tp=False.")
        if not _compat.has_symmetric_memory():
            raise UnsupportedFeatureError("async_tp=True needs"
                                          " torch.distributed._symmetric_memory, missing in torch"
                                          f" {torch.__version__}. Fix: set async_tp=False.")
    if config.float8:
        if device.type != "cuda":
            raise UnsupportedFeatureError(
                "float8=True needs a CUDA device of compute capability 8.9 or newer, but this run"
                f" uses {device.type!r}. Fix: set float8=False on this machine.")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise UnsupportedFeatureError(
                "float8=True needs compute capability 8.9 or newer (H100, L40, RTX 4090); this"
                f" device has {capability[0]}.{capability[1]}. Fix: set float8=False.")
        if importlib.util.find_spec("torchao") is None:
            raise UnsupportedFeatureError("float8=True trains with torchao's float8 linear layers,"
                                          " and torchao is not installed. Fix: `pip install"
                                          " torchao`, or set float8=False.")
        if tp != 1:
            raise UnsupportedFeatureError(
                "float8=True is supported with tensor_parallel_size=1 (float8 linears + FSDP2),"
                f" got tensor_parallel_size={tp}. Fix: set tensor_parallel_size=1, or"
                " float8=False.")


def check_model(strategy: LaunchedStrategy, module: pl.LightningModule) -> None:
    """In the launching process: check the plan and model shapes if the model already exists (built
    in ``__init__``), and that a model no plan applies to is parallelized in
    ``configure_model()``."""
    owner = type(strategy).__name__
    reject_fsdp1(module, owner)
    user_hook = is_overridden("configure_model", module)
    if strategy.plan is None:
        if not user_hook:
            raise ConfigureModelRequiredError(configure_model_required(owner))
        return
    if not has_parameters(module):
        if not user_hook:
            raise ConfigureModelRequiredError(no_plan_found(owner, module, strategy.plan,
                                                            user_hook))
        return  # built in configure_model: checked in setup, identically on every rank
    try:
        strategy.resolve(module)
    except ModelNotRecognisedError as error:
        if user_hook:
            return  # configure_model() may parallelize it: decided in setup, after the hook ran
        raise ConfigureModelRequiredError(no_plan_found(owner, module, strategy.plan,
                                                        user_hook)) from error
