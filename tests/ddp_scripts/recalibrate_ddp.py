"""2-process DDP (CPU, gloo) run of BatchNormRecalibration, launched by tests/test_recalibrate.py.

Usage: ``python recalibrate_ddp.py OUT_DIR``. Lightning re-launches this script for rank 1. Each rank writes its
running statistics and recalibration shifts to ``OUT_DIR/rank<r>.json`` and every value each BatchNorm saw during
the recalibration pass to ``OUT_DIR/inputs<r>.json``, so the test can pool them itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.recalibrate import BatchNormRecalibration

BATCH, SAMPLES, NUM_BATCHES = 8, 128, 8  # 128 samples / 2 ranks / 8 per batch: every sample is used once


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 16, generator=g) * 2 + 3
    x[1::2] += 4  # half the samples are shifted, so one rank's statistics differ from the pooled ones
    return TensorDataset(x, torch.randint(0, 2, (SAMPLES,), generator=g))


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH)


def bn_stats(net: nn.Module) -> dict[str, list[list[float]]]:
    return {
        name: [m.running_mean.tolist(), m.running_var.tolist()]
        for name, m in net.named_modules()
        if isinstance(m, nn.BatchNorm1d)
    }


class InputRecorder:
    """Keeps what each BatchNorm sees while the recalibration's forward runs (and nothing during training)."""

    def __init__(self, net: nn.Module) -> None:
        self.recording = False
        self.inputs: dict[str, list[torch.Tensor]] = {}
        for name, module in net.named_modules():
            if isinstance(module, nn.BatchNorm1d):
                module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.recording:
                self.inputs.setdefault(name, []).append(args[0].detach().clone())

        return hook

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        self.recording = True
        try:
            return model(batch[0])
        finally:
            self.recording = False


def main(out_dir: Path) -> None:
    model = Model()
    recorder = InputRecorder(model)
    recalibration = BatchNormRecalibration(num_batches=NUM_BATCHES, forward=recorder.forward)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=2,
        callbacks=[recalibration],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model)
    rank = trainer.global_rank
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"stats": bn_stats(model), "shifts": recalibration.shifts}))
    inputs = {name: torch.cat(chunks).tolist() for name, chunks in recorder.inputs.items()}
    (out_dir / f"inputs{rank}.json").write_text(json.dumps(inputs))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
