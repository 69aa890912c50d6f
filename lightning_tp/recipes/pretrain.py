"""Pretrain a Llama with TensorParallelStrategy: compose ``conf/pretrain.yaml``, instantiate, fit.

    python -m lightning_tp.recipes.pretrain                    # embedded defaults, CPU or GPU
    python -m lightning_tp.recipes.pretrain --cfg job          # print the composed config
    python -m lightning_tp.recipes.pretrain trainer.max_steps=50 --multirun optimizer.lr=1e-3,3e-4

Also ``lightning-tp pretrain ...``, and ``python recipes/pretrain.py ...`` in a clone. This module
only names its recipe: :func:`lightning_tp.recipes.entry.recipe_main` is what runs.
"""

from lightning_tp.recipes.entry import recipe_main

main = recipe_main("pretrain")

if __name__ == "__main__":
    main()
