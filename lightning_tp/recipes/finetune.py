"""Fine-tune a Llama with TensorParallelStrategy from ``conf/finetune.yaml``, for example from the
pretraining run's checkpoint::

    python -m lightning_tp.recipes.finetune checkpoint=out/pretrain/last

or from a Hugging Face model directory (``checkpoint=DIR``). Also ``lightning-tp finetune ...``, and
``python recipes/finetune.py ...`` in a clone; :func:`lightning_tp.recipes.entry.recipe_main` is
what runs.
"""

from lightning_tp.recipes.entry import recipe_main

main = recipe_main("finetune")

if __name__ == "__main__":
    main()
