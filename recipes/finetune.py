"""The finetune recipe as a script in a clone: `python recipes/finetune.py [key=value ...] [--cfg job] [--multirun]`.

A thin wrapper: the recipe is the package module :mod:`lightning_tp.recipes.finetune` (also
`python -m lightning_tp.recipes.finetune` and `lightning-tp finetune`, which work from a wheel). Lightning re-runs
this script for the other ranks. Config: `conf/finetune.yaml` (`conf` links to the packaged `lightning_tp/conf`).
"""

from lightning_tp.recipes.finetune import main

if __name__ == "__main__":
    main()
