"""The pretrain recipe as a script in a clone: `python recipes/pretrain.py [key=value ...] [--cfg job] [--multirun]`.

A thin wrapper: the recipe is the package module :mod:`lightning_tp.recipes.pretrain` (also
`python -m lightning_tp.recipes.pretrain` and `lightning-tp pretrain`, which work from a wheel). Lightning re-runs
this script for the other ranks. Config: `conf/pretrain.yaml` (`conf` links to the packaged `lightning_tp/conf`).
"""

from lightning_tp.recipes.pretrain import main

if __name__ == "__main__":
    main()
