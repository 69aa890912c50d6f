# TEMPORARY shim during the issue-13 refactor; removed before the final commit.
from lightning_tp.parallel.fsdp import apply_fsdp  # noqa: F401
from lightning_tp.parallel.grad_norm import clip_grad_norm_, total_grad_norm  # noqa: F401
from lightning_tp.parallel.parallelize import apply_tensor_parallel, materialize  # noqa: F401
from lightning_tp.parallel.recompute import apply_activation_checkpointing, compile_blocks  # noqa: F401
from lightning_tp.parallel.shapes import check_model_shapes, shape_problems  # noqa: F401
