"""Hydra recipe support: typed config schemas and the run function shared by the recipe scripts."""

from lightning_tp.recipes.config import register_configs

__all__ = ["register_configs"]
