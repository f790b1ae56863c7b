"""Train one step with ActivationMonitor, on 1 process (batch 32) or 2 DDP processes (batch 16 each, gloo).

Usage: python monitor_ddp.py OUT_DIR {single,ddp}. Rank zero writes OUT_DIR/metrics.csv through CSVLogger.
"""

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_bn import ActivationMonitor


class Net(pl.LightningModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        nn.init.constant_(self.net[0].bias, -1.5)  # some units dead on half a batch but alive on the whole
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        # rank r takes samples r, r + 2, ...: the two first batches together are the single run's first batch
        sampler = DistributedSampler(self.data, shuffle=False) if self.trainer.world_size > 1 else None
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def main(out_dir: str, mode: str) -> None:
    ddp = mode == "ddp"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=1,
        logger=CSVLogger(out_dir, name="", version=""),
        callbacks=[ActivationMonitor(every_n_steps=1)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Net(batch_size=16 if ddp else 32))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
