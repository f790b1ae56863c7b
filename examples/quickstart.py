"""Quickstart: watch activations and gradients of an MLP on scikit-learn's digits, in TensorBoard.

Trains a 64-128-128-10 ReLU network on CPU for a few seconds with ``ActivationMonitor`` and ``GradientMonitor``
logging every 10 steps and ``HealthCheck`` judging them (its diagnosis is printed at fit end), then prints the
validation accuracy and the commands that open and check the logs::

    python examples/quickstart.py
    tensorboard --logdir runs/quickstart
    lightning-bn report runs/quickstart
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_bn import ActivationMonitor, GradientMonitor, HealthCheck


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (no download), standardized, split 80 / 20."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(x))
    train, val = perm[:split], perm[split:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/quickstart", help="where TensorBoard logs go")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--fast", action="store_true", help="a few steps only (for tests)")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    train, val = digits()
    logger = TensorBoardLogger(args.logdir, name="", version=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1 if args.fast else args.max_epochs,
        limit_train_batches=12 if args.fast else None,
        logger=logger,
        log_every_n_steps=10,
        # HealthCheck prints the report's diagnosis at fit end (and can stop training: stop_on=("nonfinite",))
        callbacks=[ActivationMonitor(every_n_steps=10), GradientMonitor(every_n_steps=10), HealthCheck()],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(
        DigitsClassifier(),
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(val, batch_size=256),
    )

    accuracy = trainer.callback_metrics["val_acc"].item()
    print(f"val accuracy: {accuracy:.4f}")
    print(f"logs: {logger.log_dir}")
    print(f"view them with: tensorboard --logdir {args.logdir}")
    print(f"check them with: lightning-bn report {args.logdir}")


if __name__ == "__main__":
    main()
