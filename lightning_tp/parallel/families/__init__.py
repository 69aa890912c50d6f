"""Model families the auto plan covers, one module each, registered on import
(:mod:`~lightning_tp.parallel.families.base` holds the registry).

* :mod:`~lightning_tp.parallel.families.llama`: the native Llama; transformers' Llama, Mistral,
  Qwen2, Qwen3.
"""

from lightning_tp.parallel.families import llama
from lightning_tp.parallel.families.base import FAMILIES, Family, family_of, register_family

__all__ = ["FAMILIES", "Family", "family_of", "llama", "register_family"]
