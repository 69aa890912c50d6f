"""Pretrain a Llama with TensorParallelStrategy: compose ``conf/pretrain.yaml``, instantiate, fit.

    python -m lightning_tp.recipes.pretrain                    # embedded defaults, CPU or GPU
    python -m lightning_tp.recipes.pretrain --cfg job          # print the composed config
    python -m lightning_tp.recipes.pretrain trainer.max_steps=50 --multirun optimizer.lr=1e-3,3e-4

Same as ``lightning-tp pretrain ...`` and ``python recipes/pretrain.py ...`` in a clone. Config: the packaged
``lightning_tp/conf`` (:data:`lightning_tp.recipes.CONF_DIR`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lightning_tp.recipes.config import CONF_DIR, register_configs
from lightning_tp.recipes.entry import run_recipe, typed_errors_pass_hydra

register_configs()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="pretrain")
@typed_errors_pass_hydra
def hydra_main(cfg: DictConfig) -> None:
    from lightning_tp.recipes.run import run

    run(cfg)


def main() -> None:
    """The command line: ``sys.argv[1:]`` are Hydra overrides and flags."""
    run_recipe("pretrain", hydra_main)


if __name__ == "__main__":
    main()
