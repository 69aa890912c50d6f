"""The README example: a plain LightningModule trained with TensorParallelStrategy on 4 CPU processes.

    python recipes/quickstart.py            # dp=2 x tp=2, SP and loss parallel on
    python recipes/quickstart.py --tp 4     # dp=1 x tp=4

The module only builds a Llama and calls F.cross_entropy: no parallelisation code.
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tp import Llama, TensorParallelStrategy, get_config


class LitLlama(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        with torch.device("meta"):  # the strategy shards, materialises and calls init_weights()
            self.model = Llama(get_config("debug"))

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    L.seed_everything(0)
    # A learnable toy task: each sequence counts up from a random start, modulo the vocabulary.
    starts = torch.randint(0, 512, (256, 1))
    data = TensorDataset((starts + torch.arange(65)) % 512)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=TensorParallelStrategy(tensor_parallel_size=args.tp, data_parallel_size=args.devices // args.tp),
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(LitLlama(), DataLoader(data, batch_size=8))
    if trainer.is_global_zero:
        print(f"final train_loss={trainer.callback_metrics['train_loss'].item():.4f}")


if __name__ == "__main__":
    main()
