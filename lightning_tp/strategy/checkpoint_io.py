"""Crash-safe sharded checkpoints: ``TensorParallelStrategy``'s save, load and remove overrides.

The new checkpoint is written to ``<path>.tmp-<step>`` and swapped in only when complete
(``.metadata`` + ``meta.pt``); every stage ends with all ranks agreeing it succeeded, otherwise all
raise ``CheckpointError`` and the previous checkpoint at ``path`` is untouched. Loading refuses
incomplete directories and reads ``meta.pt`` with ``weights_only=True`` unless told otherwise.

What is on disk, and how it is published, recovered and read safely, is
:mod:`lightning_tp.checkpoint.layout` and :mod:`lightning_tp.checkpoint.safe_reading`; this module
adds what needs the ranks: agreeing on the path, writing the shards together, and reporting every
rank's failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException
from typing_extensions import override

from lightning_tp._compat import distributed_checkpoint_save, get_fqns
from lightning_tp.checkpoint.layout import (
    LAYOUT_KEY,
    check_checkpoint,
    publish,
    recover,
    refuse_to_replace,
    remove,
    staging_path,
    write_meta,
)
from lightning_tp.checkpoint.safe_reading import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_failure,
    read_meta,
)
from lightning_tp.errors import CheckpointError, CheckpointPathError

__all__ = ["AtomicCheckpointMixin", "peft_configs", "transformers_configs"]


def transformers_configs(module: Any) -> dict[str, dict[str, Any]]:
    """``{path: config.to_dict()}`` of the outermost transformers models inside ``module``: what
    ``lightning-tp export`` needs to write a checkpoint of them in their own family's format."""
    found: dict[str, dict[str, Any]] = {}
    for path, sub in module.named_modules():
        if any(path == p or path.startswith(p + ".") for p in found):
            continue
        config = getattr(sub, "config", None)
        # by the class's ancestry: FSDP2 swaps a module's class for a subclass of its own
        ours = any(c.__module__.startswith("transformers.") for c in type(sub).__mro__)
        if ours and hasattr(config, "to_dict") and getattr(config, "model_type", None):
            found[path] = config.to_dict()
    return found


def peft_configs(module: Any) -> dict[str, dict[str, Any]]:
    """``{path: {adapter name: config as JSON values}}`` of the PEFT models inside ``module``: what
    ``lightning-tp export --adapters`` writes as ``adapter_config.json``."""
    import json

    found: dict[str, dict[str, Any]] = {}
    for path, sub in module.named_modules():
        peft = any(c.__name__ == "PeftModel" and c.__module__.startswith("peft.")
                   for c in type(sub).__mro__)
        if peft and isinstance(getattr(sub, "peft_config", None), dict):
            found[path] = {name: json.loads(json.dumps(config.to_dict(), default=sorted))
                           for name, config in sub.peft_config.items()}
    return found


def _has_adapters(module: Any) -> bool:
    from lightning_tp.parallel.lora import lora_layers

    return module is not None and bool(lora_layers(module))


def _without_frozen_aliases(module: Any, state: dict[str, Any], frozen_left_out: bool
                            ) -> dict[str, Any]:
    """``state`` without the second names of frozen parameters when frozen ones are left out:
    ``ignore_frozen_params`` drops a parameter under the name ``named_parameters()`` gives it, and
    keeps a tied alias (a frozen ``lm_head.weight`` tied to ``embed_tokens.weight``)."""
    if not frozen_left_out:
        return state
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


class AtomicCheckpointMixin:
    """Save, load and remove overrides for a ``ModelParallelStrategy`` subclass (list it first)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is"
                            f" not supported because `{type(self).__name__}` does not use the"
                            " `CheckpointIO`.")
        # rank 0 decides, every rank writes to the same place
        path = Path(self.broadcast(str(filepath)))
        checkpoint[LAYOUT_KEY] = self._checkpoint_layout()
        staged = staging_path(path, int(checkpoint.get("global_step", 0)))
        # Never replace what the strategy did not write: refused on every rank, before anything is
        # touched.
        refusal = self.broadcast(refuse_to_replace(path, staged) if self.is_global_zero else None)
        if refusal:
            raise CheckpointPathError(refusal)

        def prepare() -> None:
            if self.is_global_zero:
                recover(path)  # finish or undo an earlier interrupted save of this path
                if not self._save_distributed_checkpoint:
                    return
                remove(staged)
                staged.mkdir(parents=True)

        self._checkpoint_stage("preparing", path, staged, prepare)
        if self._save_distributed_checkpoint:
            shards = {"state_dict": checkpoint.pop("state_dict")}
            shards.update({f"optimizer_{i}": s
                           for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
            self._checkpoint_stage("writing the shards", path, staged,
                                   lambda: distributed_checkpoint_save(shards, staged))

            def finish() -> None:
                if self.is_global_zero:
                    write_meta(checkpoint, staged)
                    publish(staged, path)
        else:  # one file with the full state, assembled on rank 0

            def finish() -> None:
                if self.is_global_zero:
                    self.checkpoint_io.save_checkpoint(checkpoint, staged)
                    publish(staged, path)

        self._checkpoint_stage("publishing", path, staged, finish)

    def _checkpoint_layout(self) -> dict[str, Any]:
        """What a checkpoint records about the run: the parameter order (for param-id keyed
        optimizer states in a consolidated file) and the mesh sizes."""
        names = []
        assert self.model is not None
        for name, _ in self.model.named_parameters():
            fqns = get_fqns(self.model, name)
            names.append(next(iter(fqns)) if len(fqns) == 1 else name)
        return {"format": 1, "parameter_names": names,
                "data_parallel_size": self.data_parallel_size,
                "tensor_parallel_size": self.tensor_parallel_size,
                "transformers": transformers_configs(self.model),
                "adapters_only": _has_adapters(self.model), "peft": peft_configs(self.model)}

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The model's state (sharded, or full on rank 0 as the parent's); with LoRA adapters, only
        what trains: the frozen base is not written (it is the checkpoint fine-tuning started
        from)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint,
                                   cpu_offload=True, ignore_frozen_params=_has_adapters(self.model))
        state = get_model_state_dict(self.model, options=options)
        return _without_frozen_aliases(self.model, state, options.ignore_frozen_params)

    def _checkpoint_stage(self, what: str, path: Any, staged: Any, fn: Any) -> None:
        """Run one stage of a save on every rank; if it failed anywhere, clean up, raise on all."""
        error: Optional[BaseException] = None
        try:
            fn()
        except (Exception, CheckpointException) as e:  # DCP's error is a BaseException; see below
            error = e
        if self.reduce_boolean_decision(error is None, all=True):
            return
        if isinstance(error, CheckpointException):  # DCP gathered every rank's failure: name them
            # each failure is an exception or an (exception, traceback) pair
            causes = {rank: wrapped[0] if isinstance(wrapped, tuple) else wrapped
                      for rank, wrapped in error.failures.items()}
            local = "; ".join(f"rank {rank}:"
                              f" {type(e).__name__}: {e}" for rank, e in sorted(causes.items()))
        else:
            local = (None if error is None
                     else f"rank {self.global_rank}: {type(error).__name__}: {error}")
        messages: list[Any] = [None] * self.world_size
        dist.all_gather_object(messages, local)
        failed = sorted({message for message in messages if message})
        if self.is_global_zero:
            try:
                remove(staged)
            except OSError:
                pass
        raise CheckpointError(
            f"Saving the checkpoint {str(path)!r} failed while {what} ({'; '.join(failed)})."
            " Nothing was published: the previous checkpoint at that path, if any, is unchanged."
        ) from error

    @override
    def load_checkpoint(self, checkpoint_path: Any,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a sharded checkpoint directory (any (dp, tp)) or a single full file (see
        ``consolidate``).

        ``weights_only=None`` means ``True``: ``meta.pt`` (or the single file) is read with
        ``torch.load(weights_only=True)``, DCP's ``.metadata`` with an allow-list unpickler.
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        if self.is_global_zero:
            recover(path)
        self.barrier("load_checkpoint")
        check_checkpoint(path)
        weights_only = True if weights_only is None else weights_only
        try:
            if path.is_file():
                return super().load_checkpoint(path, weights_only=weights_only)
            return self._load_sharded_checkpoint(path, weights_only)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:
            raise read_failure(f"Could not load the checkpoint {str(path)!r}", e,
                               weights_only) from e

    def _load_sharded_checkpoint(self, path: Any, weights_only: bool) -> dict[str, Any]:
        # Lightning's `_load_checkpoint` for directories, reading through the safe DCP reader and
        # planner.
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        def read(state: dict[str, Any]) -> None:
            if weights_only:
                load(state, storage_reader=SafeFileSystemReader(str(path)),
                     planner=SafeLoadPlanner())
            else:
                load(state, checkpoint_id=path)

        assert self.model is not None and self.lightning_module is not None
        meta = read_meta(path, weights_only=weights_only)
        layout = meta.get(LAYOUT_KEY, {})
        adapters_only = bool(layout.get("adapters_only", False))
        self._check_stored_layout(path, int(layout.get("tensor_parallel_size") or 0))
        state = get_model_state_dict(self.model,
                                     options=StateDictOptions(ignore_frozen_params=adapters_only))
        module_state = {"state_dict": _without_frozen_aliases(self.model, state, adapters_only)}
        read(module_state)
        # An adapter checkpoint is read for the trained parameters only (DCP refuses a requested
        # key it does not hold): the frozen base stays as the model was built.
        strict = self.lightning_module.strict_loading and not adapters_only
        self.model.load_state_dict(module_state["state_dict"], strict=strict)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            read(optim_state)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return meta

    def _check_stored_layout(self, path: Any, stored_tp: int) -> None:
        """Refuse a checkpoint whose weights are in another layout than this run's: styles with a
        layout of their own (fused projections' row order, experts' shape) apply at tp > 1 only, so
        such a model's checkpoint reshards between any tp > 1, not across tp 1."""
        plan, tp = getattr(self, "_resolved_plan", None), self.tensor_parallel_size
        if not stored_tp or plan is None or (stored_tp > 1) == (tp > 1):
            return
        own = sorted(p for p, style in plan.styles.items() if hasattr(style, "model_layout"))
        if own:
            raise CheckpointError(
                f"The checkpoint {str(path)!r} was saved at tensor_parallel_size={stored_tp} and"
                f" this run has tensor_parallel_size={tp}: {own[0]}"
                f"{f' and {len(own) - 1} more' if len(own) > 1 else ''} keep their weights in the"
                " plan's layout at tp > 1 and in the model's own at tp 1, so the tensors would load"
                " in the wrong order. Fix: resume at a tensor_parallel_size on the same side of 1,"
                " or export the checkpoint (`lightning-tp export`) and start from the exported"
                " directory (checkpoint=DIR).")

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete a checkpoint (rank 0); a directory stops looking complete before its files go."""
        if self.is_global_zero:
            remove(filepath)
