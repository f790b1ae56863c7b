"""HealthCheck under DDP (2 processes, gloo): a NaN gradient from step 2 stops both ranks at the same step, no hang.

Usage: python healthcheck_ddp.py OUT_DIR {nan,healthy}. Each rank writes OUT_DIR/rank<r>.json: its global_step at the
end and what HealthCheck recorded.
"""

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor, HealthCheck


class Net(pl.LightningModule):
    def __init__(self, nan: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.nan = nan
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(256, 8, generator=g), torch.randint(0, 4, (256,), generator=g))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.nan and self.global_step >= 2:
            loss = loss * math.nan
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)


def main(out_dir: str, mode: str) -> None:
    check = HealthCheck(stop_on=("nonfinite",), summary=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        logger=CSVLogger(out_dir, name="", version=""),
        callbacks=[ActivationMonitor(every_n_steps=2, histograms=False), GradientMonitor(every_n_steps=2), check],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(nan=mode == "nan"))
    record = {"global_step": trainer.global_step, "stopped": list(check.stopped) if check.stopped else None}
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
