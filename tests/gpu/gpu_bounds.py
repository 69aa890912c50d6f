"""The GPU tier's tolerances, stated once (the CPU tier's are in ``tests/tolerances.py``; bf16-mixed against fp32 uses
its ``LOSS_REL["bf16-mixed"]``). None has been measured on a GPU yet: each is derived from the formats and kernels
involved, with a margin, and is to be replaced by ~10x the achieved error once the tier has run (docs/performance.md,
"GPU tier").
"""

from __future__ import annotations

COMPILE_LOSS_REL = 1e-5
"""Per-block ``torch.compile`` against eager, both fp32, per-step loss, relative. Inductor fuses the element-wise ops
(RMSNorm, RoPE, SwiGLU) into generated kernels with their own evaluation order and math approximations (libdevice
``rsqrt``, ``exp``) while the matmuls and attention stay ATen's; that moves the loss by a few fp32 ulps (~1e-7) a step.
The bound is 10x the CPU tier's fp32 bound, for kernels that are not the same."""

NCCL_FP32_LOSS_REL = 1e-5
"""tp >= 2 over nccl against one GPU, fp32 (TF32 off, torch's default for matmuls), per-step loss, relative. The
sharded matmuls have other shapes (cuBLAS may pick other kernels and split-K orders) and the partial sums are added
by the collective in another order: a few fp32 ulps, as on the CPU tier (1.5e-7 achieved there, bound 1e-6); 10x that
bound for the kernels."""

FLOAT8_LOSS_REL = 5e-2
"""float8 (torchao, e4m3 forward, tensor-wise scales) against bf16-mixed, per-step loss, relative. e4m3 keeps 3
mantissa bits, a rounding of up to 2^-4 = 6.25% per element, averaged over the decoder blocks' dot products (lm_head
stays bf16); at init the loss is ~ln(vocab) and the logits are small, so the loss moves far less. A float8 path that is
wrong (unscaled, transposed, saturated) moves it by more than this bound."""
