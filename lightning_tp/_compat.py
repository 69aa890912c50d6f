"""Every private Lightning and torch symbol lightning-tp uses, in one place, with what it is for.

Private APIs change without deprecation, so no other module imports one: a release that moves or
renames a symbol breaks this file alone, at import, with the name that moved. Each was checked
against the versions the test suite runs (:data:`TESTED`); ``pyproject.toml`` admits only those
minor releases.
"""

from __future__ import annotations

from typing import Any

import torch

# Lightning: the launchers lightning-tp extends (script re-run, fork) and the helpers they call.
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities import imports as _lightning_imports
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

# torch.distributed.checkpoint: reading a sharded checkpoint without a process group.
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import _get_fqns
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

# DTensor: which slice of a global tensor a rank holds (to read only that slice from safetensors).
from torch.distributed.tensor import _utils as _dtensor_utils

__all__ = [
    "TESTED",
    "ChildProcessObserver",
    "EmptyStateDictLoadPlanner",
    "MultiProcessingLauncher",
    "SubprocessScriptLauncher",
    "WorkerOutput",
    "compute_local_shape_and_global_offset",
    "distributed_checkpoint_save",
    "enable_async_tp",
    "get_fqns",
    "has_symmetric_memory",
    "is_interactive",
    "load_state_dict_no_process_group",
    "optimizers_to_device",
    "set_element",
    "set_num_threads_if_needed",
]

TESTED = {"lightning": ("2.6",), "torch": ("2.13",)}
"""The minor releases every symbol below was checked against (the CI installs these)."""

ChildProcessObserver = _ChildProcessObserver
"""Lightning's watchdog thread: kills every rank when one of the script launcher's children dies."""
SubprocessScriptLauncher = _SubprocessScriptLauncher
MultiProcessingLauncher = _MultiProcessingLauncher
WorkerOutput = _WorkerOutput
"""The named tuple the fork launcher's rank 0 returns to the launching process (fields by name, not
position)."""
set_num_threads_if_needed = _set_num_threads_if_needed
optimizers_to_device = _optimizers_to_device
distributed_checkpoint_save = _distributed_checkpoint_save
"""Lightning's DCP save of a state dict into a directory (what
``ModelParallelStrategy.save_checkpoint`` calls)."""
EmptyStateDictLoadPlanner = _EmptyStateDictLoadPlanner
"""DCP's planner that builds the state dict from the checkpoint's metadata (consolidation without a
model)."""
load_state_dict_no_process_group = _load_state_dict
"""DCP's loader with ``no_dist=True``: one process reads every shard."""
get_fqns = _get_fqns
"""The fully qualified parameter names DCP stores for a module attribute path (wrappers
stripped)."""


def is_interactive() -> bool:
    """Lightning's test for a Jupyter/IPython session (the fork launcher's ``"auto"`` case), read
    when asked, so that a test or a notebook that sets Lightning's flag is seen."""
    return bool(_lightning_imports._IS_INTERACTIVE)


def compute_local_shape_and_global_offset(global_shape: Any, mesh: Any, placements: Any) -> Any:
    """The shape of this rank's shard of a DTensor of ``global_shape`` and its offset in the global
    tensor (DTensor's own helper, looked up when called)."""
    return _dtensor_utils.compute_local_shape_and_global_offset(global_shape, mesh, placements)


def has_symmetric_memory() -> bool:
    """Whether this torch build has symmetric memory (what async TP's micro-pipelining needs)."""
    return hasattr(torch.distributed, "_symmetric_memory")


def enable_async_tp(tp_group_name: str) -> None:
    """Let the compiler fuse TP all-gathers/reduce-scatters with the neighbouring matmuls (CUDA
    only)."""
    from torch._inductor import config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_group_name)

