"""The recipes' Hydra configs (``pretrain.yaml``, ``finetune.yaml``, ``plan.yaml`` and their
groups), shipped as package data. A package so that Hydra finds it as ``pkg://lightning_tp.conf``
too (``initialize_config_module("lightning_tp.conf")``); its directory is
:data:`lightning_tp.recipes.CONF_DIR`.
"""
