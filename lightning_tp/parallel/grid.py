"""2D tensor parallelism: the TP group as an ``r × c`` grid, each decoder projection split on both
of its dimensions.

Weight-stationary, after the 2D layouts of Pope et al. 2022 ("Efficiently Scaling Transformer
Inference", §3.2.2): weights never move; activations are all-gathered and reduce-scattered along
the grid's rows or columns. The mesh has dims ``"tp_row"`` (``r`` devices, R below) and
``"tp_col"`` (``c`` devices, C); device ``(i, j)`` is rank ``i·c + j`` of the flattened
``"tensor_parallel"`` mesh.

Between blocks each device holds ``[b, s/r, h/c]`` of the residual stream: the sequence split over R
and the hidden dimension over C. In each block (attention; the MLP is the same with gate/up and
down):

1. the block input is all-gathered over R along the sequence: ``[b, s, h/c]``, once for q, k, v;
2. q, k, v (``[out, h]`` split ``out`` over R, ``h`` over C) give partial sums over C of
   ``[b, s, out/r]``, reduce-scattered over C: ``[b, s, out/(r·c)]``, the heads of chunk
   ``i·c + j``;
3. attention runs on the device's own heads;
4. ``o_proj`` (``[h, q]`` split ``q`` over R, ``h`` over C) takes its input all-gathered over C
   (``[b, s, q/r]``) and gives partial sums over R of ``[b, s, h/c]``, reduce-scattered over R along
   the sequence: ``[b, s/r, h/c]`` again.

Backward runs the dual collectives: each all-gather's gradient is reduce-scattered over the same
group and each reduce-scatter's gradient all-gathered; q, k and v's input gradients are partial
sums over R that autograd adds locally before one reduce-scatter. Norms run on ``[b, s/r, h/c]``:
the mean of squares is a partial sum over C, all-reduced (``b·s/r`` elements); the norm weight is
split over C and its gradient is all-reduced over R. The embedding and ``lm_head`` split the
vocabulary over all ``r·c`` devices of the flattened mesh, as in 1D, with the same loss
parallelism (per step, not per layer). The derivation of the bytes and where 2D beats 1D:
``docs/2d.md``.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel

__all__ = [
    "GridBlockInput",
    "GridColwise",
    "GridHead",
    "GridNorm",
    "GridRowwise",
    "GRID_SPLITS",
    "GridStyle",
    "grid_divisor",
    "grid_llama_plan",
    "tp_mesh_of",
]

Placements = tuple[Placement, Placement]

RESIDUAL: Placements = (Shard(1), Shard(2))
"""Between blocks: ``[b, s, h]`` with the sequence over R and the hidden dimension over C."""
GATHERED: Placements = (Replicate(), Shard(2))
"""A block's input once all-gathered over R: the whole sequence, the hidden dimension over C."""
HEADS: Placements = (Shard(2), Shard(2))
"""A column-parallel output: its last dimension over R, then within that over C."""
WHOLE: Placements = (Replicate(), Replicate())


def _as_dtensor(x: Any, mesh: Any, given: Placements) -> Any:
    if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
        return DTensor.from_local(x, mesh, given, run_check=False)
    return x


def _moved(x: DTensor, placements: Placements) -> DTensor:
    return x if tuple(x.placements) == tuple(placements) else x.redistribute(placements=placements)


def _shard_parameters(module: nn.Module, mesh: Any, placements: Any) -> None:
    """Each parameter of ``module`` (its own) a DTensor on ``mesh`` with ``placements(name)``,
    frozen if it was."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, placements(name)), requires_grad=param.requires_grad))


class GridStyle(ParallelStyle):
    """A style applied over the 2D ``(tp_row, tp_col)`` mesh (the others of a 2D plan, the
    embedding's and ``lm_head``'s, are applied over the flattened 1D mesh)."""


class _GridLinear(GridStyle):
    weight: Placements
    bias: Placements
    given: Placements
    """The placements of a plain-tensor input (a DTensor input keeps its own)."""
    wanted: Placements
    """What the input is redistributed to before the local matmul."""
    out: Placements
    """What the output is redistributed to after it."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{type(self).__name__} shards nn.Linear, got {type(module).__name__}")

        def partition(_name: str, mod: nn.Module, mesh: Any) -> None:
            _shard_parameters(mod, mesh,
                              lambda name: self.weight if name == "weight" else self.bias)

        def inputs(_mod: nn.Module, args: tuple, mesh: Any) -> tuple:
            x = _as_dtensor(args[0], mesh, self.given)
            return (_moved(x, self.wanted), *args[1:])

        def outputs(_mod: nn.Module, out: DTensor, _mesh: Any) -> Any:
            return _moved(out, self.out).to_local()

        return distribute_module(module, device_mesh, partition, inputs, outputs)


class GridColwise(_GridLinear):
    """q/k/v, gate/up: weight ``[out, in]`` split ``out`` over R and ``in`` over C; input ``[b, s,
    in/c]`` (whole sequence); output ``[b, s, out/(r·c)]``, one reduce-scatter over C."""

    weight = (Shard(0), Shard(1))
    bias = (Shard(0), Replicate())
    given = GATHERED
    wanted = GATHERED
    out = HEADS


class GridRowwise(_GridLinear):
    """o_proj, down_proj: weight ``[out, in]`` split ``in`` over R and ``out`` over C; input
    ``[b, s, in/(r·c)]`` all-gathered over C; output ``[b, s/r, out/c]``, one reduce-scatter over
    R."""

    weight = (Shard(1), Shard(0))
    bias = (Replicate(), Shard(0))
    given = HEADS
    wanted = (Shard(2), Replicate())
    out = RESIDUAL


class _GridRMSNorm(torch.autograd.Function):
    """RMSNorm of ``[b, s/r, h/c]`` (fp32 statistics, as Llama's reference norms): the sum of
    squares all-reduced over C forward, the sum of ``g·x̂`` all-reduced over C backward; keeps the
    input and one fp32 scale per token."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float, hidden: int, group: Any) -> Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        squares = x32.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(squares, group=group)
        rstd = torch.rsqrt(squares / hidden + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.hidden, ctx.group = hidden, group
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:  # this device's tokens only: a partial sum over R
            grad_weight = (grad * normed.to(x.dtype)).sum(tuple(range(grad.ndim - 1)))
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(rstd.dtype)
            dot = (g * normed).sum(-1, keepdim=True)
            dist.all_reduce(dot, group=ctx.group)
            grad_x = (rstd * (g - normed * dot / ctx.hidden)).to(x.dtype)
        return grad_x, grad_weight, None, None, None


def norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a Llama-style RMSNorm (``weight * x / rms(x)``, the native one and
    transformers' Llama, Mistral and Qwen2 norms), None for any other module."""
    weight = getattr(module, "weight", None)
    if not type(module).__name__.endswith("RMSNorm") or "Gemma" in type(module).__name__:
        return None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return None
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    return float(eps) if isinstance(eps, (int, float)) else None


class GridNorm(GridStyle):
    """A Llama-style RMSNorm over the hidden dimension of ``[b, s/r, h/c]``: weight split over C,
    the statistics all-reduced over C (:class:`_GridRMSNorm`), the weight's gradient a partial sum
    reduced over R with the other gradients.

    ``whole_output=True`` (the final norm, before ``lm_head`` on the flattened mesh) all-gathers the
    output into a plain ``[b, s, h]``; otherwise it stays a ``[b, s/r, h/c]`` DTensor for the block
    that follows.
    """

    def __init__(self, *, whole_output: bool = False) -> None:
        super().__init__()
        self.whole_output = whole_output

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        eps = norm_eps(module)
        if eps is None:
            raise TypeError(f"{type(self).__name__} computes Llama's RMSNorm; got"
                            f" {type(module).__name__}")
        _shard_parameters(module, device_mesh, lambda _name: (Replicate(), Shard(0)))
        module._grid_norm = (eps, self.whole_output)  # type: ignore[assignment]
        # a method of the module, not a closure over it: a deep copy runs its own weights
        module.forward = types.MethodType(_grid_norm_forward, module)  # type: ignore[method-assign]
        return module


def _grid_norm_forward(module: nn.Module, x: Any) -> Any:
    eps, whole_output = module._grid_norm
    weight = module.weight  # a (tp_row, tp_col) DTensor (FSDP2 gives it back unsharded in forward)
    mesh = weight.device_mesh
    local = x.to_local() if isinstance(x, DTensor) else x
    out = _GridRMSNorm.apply(local, weight.to_local(grad_placements=(Partial(), Shard(0))), eps,
                             weight.shape[0], mesh.get_group("tp_col"))
    out = DTensor.from_local(out, mesh, RESIDUAL, run_check=False)
    if not whole_output:
        return out
    # lm_head's input gradient comes back as each device's partial sum (its vocabulary rows'):
    # reduce-scattered over R and C here, instead of all-reduced and then sliced
    return _moved(out, WHOLE).to_local(grad_placements=(Partial(), Partial()))


class GridBlockInput(GridStyle):
    """Before ``self_attn`` / ``mlp``: the block input (the norm's ``[b, s/r, h/c]`` DTensor)
    all-gathered over R along the sequence, kept a DTensor so that the projections' input
    gradients come back as partial sums and are reduced once.

    ``kwarg``: the argument's name when the module is called with it by keyword (attention);
    otherwise the first positional argument.
    """

    def __init__(self, kwarg: str | None = None) -> None:
        super().__init__()
        self.kwarg = kwarg

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        def gathered(x: Any) -> Any:
            return _moved(_as_dtensor(x, device_mesh, RESIDUAL), GATHERED)

        if self.kwarg is None:
            module.register_forward_pre_hook(lambda _m, args: (gathered(args[0]), *args[1:]))
        else:
            name = self.kwarg

            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
                if name in kwargs:
                    kwargs = {**kwargs, name: gathered(kwargs[name])}
                else:
                    args = (gathered(args[0]), *args[1:])
                return args, kwargs

            module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class GridHead(ParallelStyle):
    """``lm_head`` of a 2D plan, over the flattened TP mesh: the weight split by vocabulary rows
    (``Shard(0)``, as the embedding's, so tied weights stay one tensor), the input the whole
    ``[b, s, h]`` of the final :class:`GridNorm`, the logits vocab-sharded (``Shard(-1)``, for loss
    parallelism) or all-gathered.

    The matmul runs on local tensors: the weight's gradient is this device's rows' whole gradient,
    and the input's gradient is a partial sum over the devices, handed back as such for the final
    norm to reduce-scatter (torch's ``ColwiseParallel`` with a replicated input would all-reduce
    it: twice the bytes).
    """

    def __init__(self, *, loss_parallel: bool = True) -> None:
        super().__init__()
        self.loss_parallel = loss_parallel

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{type(self).__name__} shards nn.Linear, got {type(module).__name__}")
        _shard_parameters(module, device_mesh, lambda _name: [Shard(0)])  # weight, bias by rows
        module._grid_head = self.loss_parallel  # type: ignore[assignment]
        module.forward = types.MethodType(_grid_head_forward, module)  # type: ignore[method-assign]
        return module


def _grid_head_forward(module: nn.Module, x: Tensor) -> Any:
    weight = module.weight
    bias = None if module.bias is None else module.bias.to_local()
    logits = torch.nn.functional.linear(x, weight.to_local(), bias)
    logits = DTensor.from_local(logits, weight.device_mesh, [Shard(logits.ndim - 1)],
                                run_check=False)
    return logits if module._grid_head else logits.redistribute(placements=[Replicate()]).to_local()


class GridEntry(GridStyle):
    """On the first block: the whole embedding output ``[b, s, h]`` sliced to this device's
    ``[b, s/r, h/c]`` (no communication forward; two all-gathers of its gradient backward)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
            def sliced(x: Any) -> Any:
                return _moved(_as_dtensor(x, device_mesh, WHOLE), RESIDUAL).to_local()

            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": sliced(kwargs["hidden_states"])}
            return (sliced(args[0]), *args[1:]), kwargs

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


def grid_llama_plan(*, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """The 2D plan of Llama-family models with Hugging Face module names (the native Llama,
    transformers' Llama, Mistral and Qwen2)."""
    return {
        # over the flattened mesh, as in 1D: the embedding's output whole, logits vocab-sharded
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(),
                                              output_layouts=Replicate()),
        "lm_head": GridHead(loss_parallel=loss_parallel),
        # over the grid
        "model.layers.0": GridEntry(),
        "model.layers.*.input_layernorm": GridNorm(),
        "model.layers.*.self_attn": GridBlockInput("hidden_states"),
        "model.layers.*.self_attn.q_proj": GridColwise(),
        "model.layers.*.self_attn.k_proj": GridColwise(),
        "model.layers.*.self_attn.v_proj": GridColwise(),
        "model.layers.*.self_attn.o_proj": GridRowwise(),
        "model.layers.*.post_attention_layernorm": GridNorm(),
        "model.layers.*.mlp": GridBlockInput(),
        "model.layers.*.mlp.gate_proj": GridColwise(),
        "model.layers.*.mlp.up_proj": GridColwise(),
        "model.layers.*.mlp.down_proj": GridRowwise(),
        "model.norm": GridNorm(whole_output=True),
    }


def tp_mesh_of(mesh: Any) -> Any:
    """``mesh["tensor_parallel"]``: the 1D TP mesh, or a 2D mesh's flattened ``(tp_row, tp_col)``
    (without torch's warning that slicing a flattened dim from the root mesh will be deprecated:
    the strategy keeps the name so that code written for 1D meshes runs unchanged)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim", category=UserWarning)
        return mesh["tensor_parallel"]


def split_grid_styles(styles: dict[str, ParallelStyle]) -> tuple[dict[str, ParallelStyle],
                                                                 dict[str, ParallelStyle]]:
    """``(over the grid, over the flattened mesh)``."""
    grid = {k: v for k, v in styles.items() if isinstance(v, GridStyle)}
    return grid, {k: v for k, v in styles.items() if k not in grid}


GRID_SPLITS: tuple[tuple[str, str], ...] = (
    ("num_attention_heads", "r·c"), ("num_key_value_heads", "r·c"), ("hidden_size", "c"),
    ("intermediate_size", "r·c"))
"""The model dimensions the 2D plan splits and over what: query and KV heads over all ``r·c``
devices (each computes whole heads), the hidden size over the columns (residual ``[b, s/r, h/c]``,
norm weights), the MLP width over all (gate/up outputs ``F/(r·c)``). The strategy checks a built
model against it (:func:`grid_model_problems`), the planner a config's fields."""


def grid_divisor(over: str, grid: tuple[int, int]) -> int:
    """How many parts ``over`` (``"r·c"`` or ``"c"``, from :data:`GRID_SPLITS`) is for ``grid``."""
    return grid[1] if over == "c" else grid[0] * grid[1]


def grid_model_problems(module: nn.Module, roots: list[str], grid: tuple[int, int]) -> list[str]:
    """One message per thing in the models at ``roots`` that the 2D plan cannot split over the
    ``(r, c)`` grid: a family other than Llama's (or Qwen3's per-head norms), a dimension of
    :data:`GRID_SPLITS` not divisible as it says, a norm that is not Llama's RMSNorm, PEFT
    adapters. The vocabulary is split over the flattened mesh as in 1D, and checked as there
    (:func:`lightning_tp.parallel.shapes.check_model_shapes`)."""
    from lightning_tp.parallel.families.base import family_of
    from lightning_tp.parallel.families.llama import LLAMA
    from lightning_tp.parallel.lora import lora_layers

    where = f"tensor_parallel_size=({grid[0]}, {grid[1]})"
    problems = []
    if lora_layers(module):
        problems.append(f"{where} does not shard PEFT adapters (fix: LoRA with an int"
                        " tensor_parallel_size, 1D)")
    for root in roots:
        model = module.get_submodule(root)
        name = f"{type(model).__name__} at {root or '<root>'!r}"
        if family_of(model) is not LLAMA or hasattr(
                model.get_submodule("model.layers.0.self_attn"), "q_norm"):
            problems.append(f"{where} has a plan for Llama, Mistral and Qwen2 models only; {name}"
                            " is not one (fix: an int tensor_parallel_size, 1D, which covers every"
                            " family)")
            continue
        config = model.config
        for attr, what in GRID_SPLITS:
            value, divisor = getattr(config, attr), grid_divisor(what, grid)
            if value % divisor:
                problems.append(f"{attr}={value} of {name} is not divisible by {what} = {divisor}"
                                f" of {where} (fix: a grid whose {what} divides {value}, or 1D)")
        norms = [path for path, m in model.named_modules()
                 if path.endswith(("layernorm", "norm")) and not list(m.children())
                 and norm_eps(m) is None]
        if norms:
            problems.append(f"{where} computes Llama's RMSNorm; {norms[0]} of {name} is a"
                            f" {type(model.get_submodule(norms[0])).__name__} (fix: 1D)")
    return problems


def grid_local_shape(style: ParallelStyle, name: str, shape: tuple[int, ...],
                     grid: tuple[int, int]) -> tuple[int, ...] | None:
    """The per-device shape of parameter ``name`` (of global ``shape``) under a grid ``style``, from
    its placements over ``(r, c)`` and without a mesh (``torch.chunk``'s rounding); None for a style
    that is not a grid style."""
    if isinstance(style, _GridLinear):
        placements = style.weight if name == "weight" else style.bias
    elif isinstance(style, GridNorm):
        placements = (Replicate(), Shard(0))
    elif isinstance(style, GridHead):  # by vocabulary rows over all r·c devices
        return (-(-shape[0] // (grid[0] * grid[1])), *shape[1:])
    else:
        return None
    local = list(shape)
    for placement, parts in zip(placements, grid, strict=True):
        if isinstance(placement, Shard):
            local[placement.dim] = -(-local[placement.dim] // parts)
    return tuple(local)
