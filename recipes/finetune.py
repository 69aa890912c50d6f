"""Finetune a Llama with TensorParallelStrategy: compose the config, instantiate, fit.

    python recipes/finetune.py                       # embedded defaults, CPU or GPU
    python recipes/finetune.py --cfg job             # print the composed config
    python recipes/finetune.py trainer.max_steps=50 --multirun optimizer.lr=1e-3,3e-4

Same as `lightning-tp finetune ...`. Config: conf/finetune.yaml and the groups under conf/.
"""

import sys

import hydra
from omegaconf import DictConfig

from lightning_tp.recipes import check_overrides, flags_first, register_configs
from lightning_tp.recipes.run import run

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run(cfg, checkpoint=cfg.checkpoint)


if __name__ == "__main__":
    sys.argv = flags_first(sys.argv)
    check_overrides("finetune", sys.argv)
    main()
