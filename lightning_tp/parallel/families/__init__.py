"""Model families the auto plan covers, one module each, registered on import
(:mod:`~lightning_tp.parallel.families.base` holds the registry). Every module of this package is
imported here, so a new family is a new module.

* :mod:`~lightning_tp.parallel.families.llama`: the native Llama; transformers' Llama, Mistral,
  Qwen2, Qwen3.
* :mod:`~lightning_tp.parallel.families.gemma`: Gemma, Gemma-2, Gemma-3 (text).
* :mod:`~lightning_tp.parallel.families.phi3`: Phi-3 (fused projections,
  :mod:`lightning_tp.parallel.fused`).
* :mod:`~lightning_tp.parallel.families.olmo2`: OLMo-2 (full-width q/k norms).
* :mod:`~lightning_tp.parallel.families.granite`: Granite.
* :mod:`~lightning_tp.parallel.families.moe`: Mixtral, Qwen3-MoE (experts,
  :mod:`lightning_tp.parallel.experts`).
* :mod:`~lightning_tp.parallel.families.derived`: any other transformers class, from its own
  ``base_model_tp_plan`` and structure (the fallback of ``plan="auto"``).
"""

import importlib
import pkgutil

from lightning_tp.parallel.families import llama
from lightning_tp.parallel.families.base import FAMILIES, Family, family_of, register_family

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "llama"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FAMILIES", "Family", "family_of", "llama", "register_family"]
