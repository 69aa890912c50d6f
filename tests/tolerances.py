"""Parity tolerances, stated once: how far a distributed run may sit from the single-process reference.

Each bound is about 10x the worst error the suite achieves (measured on the 2-core CPU machine, gloo, torch 2.13),
so a 10x regression in the numerics fails. Import it from a test module (``tests/`` is on ``sys.path``)::

    from tolerances import FP32, assert_losses_close

Achieved, fp32, ``tests/test_multiprocess.py`` (the dense Llama at (dp, tp) = (2, 2), (1, 4), (1, 2), every flag
set, accumulation, activation checkpointing, mixed-mesh clipping with AdamW and SGD):

============================  ==========  =========
quantity                      achieved    tolerance
============================  ==========  =========
loss, relative                1.5e-7      1e-6
gradient (after clipping)     4.5e-8      1e-6
parameter after 5 steps       8.2e-6      2e-5
total gradient norm, rel.     2.7e-7      1e-6
============================  ==========  =========

(The parameter error is larger than the gradient error because AdamW divides by sqrt(v): tiny gradient
differences in elements with tiny gradients become full-size update differences. With SGD the parameter error
is lr x the gradient error.)

Reduced precision compares with the same single-process computation in fp32 (the distributed reduction order
differs from one process's, so a same-dtype reference is no closer): the bounds below are the loss's relative
error over five steps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    loss_rel: float  # |ours - ref| / |ref| per logged loss
    grad_abs: float  # max |ours - ref| over every element of every gradient, after clipping
    param_abs: float  # max |ours - ref| over every element of every parameter at the end of the run
    norm_rel: float  # total gradient norm, relative


FP32 = Tolerance(loss_rel=1e-6, grad_abs=1e-6, param_abs=2e-5, norm_rel=1e-6)

# Loss only (reduced-precision gradients and parameters are not compared element-wise), against the fp32 reference.
LOSS_REL = {"32-true": FP32.loss_rel, "bf16-mixed": 2e-3, "bf16-true": 2e-2, "16-true": 5e-3}


def losses_close(ours: list[float], ref: list[float], rel: float = FP32.loss_rel) -> bool:
    return len(ours) == len(ref) > 0 and all(abs(a - b) <= rel * abs(b) for a, b in zip(ours, ref, strict=True))


def assert_losses_close(ours: list[float], ref: list[float], rel: float = FP32.loss_rel, what: object = "") -> None:
    assert len(ours) == len(ref) > 0, (what, ours, ref)
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True))
    assert worst <= rel, (what, f"loss rel err {worst:.2e} > {rel:.0e}", ours, ref)


def assert_max_err(errors: dict[str, float], bound: float, what: object = "") -> None:
    """``errors``: per-tensor max error; fails naming the worst tensor."""
    assert errors, (what, "nothing compared")
    name, worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst <= bound, (what, f"{name}: {worst:.2e} > {bound:.0e}")
