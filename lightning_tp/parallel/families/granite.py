"""The Granite family: transformers' ``GraniteForCausalLM`` (IBM Granite 3), the Llama plan as is.

Granite is Llama with four scalars: ``embedding_multiplier`` scales the embedding output,
``residual_multiplier`` each sublayer's output before its residual add, ``attention_multiplier``
is the attention's softmax scale, and ``logits_scaling`` divides the logits. Each is applied
elementwise to a tensor whose layout the Llama plan already fixes (the replicated embedding
output, the attention and MLP outputs after their reduction, the vocab-sharded logits), and the
modules are named and called as Llama's (attention with ``hidden_states=``, the MLP with one
positional input), so :func:`~lightning_tp.parallel.families.llama.plan_for_llama` fits with no
change. Communication: exactly the Llama minimum per layer.
"""

from __future__ import annotations

from lightning_tp.parallel.families.base import Family, register_family
from lightning_tp.parallel.families.llama import plan_for_llama

__all__ = ["GRANITE"]

GRANITE = register_family(Family("granite", ("GraniteForCausalLM",), plan_for_llama))
