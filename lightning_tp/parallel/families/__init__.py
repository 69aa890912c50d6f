"""Model families the auto plan covers, one module each, registered on import
(:mod:`~lightning_tp.parallel.families.base` holds the registry). Every module of this package is
imported here, so a new family is a new module.

* :mod:`~lightning_tp.parallel.families.llama`: the native Llama; transformers' Llama, Mistral,
  Qwen2, Qwen3.
"""

import importlib
import pkgutil

from lightning_tp.parallel.families import llama
from lightning_tp.parallel.families.base import FAMILIES, Family, family_of, register_family

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "llama"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FAMILIES", "Family", "family_of", "llama", "register_family"]
