"""AutoInit under real 2-process DDP (CPU, gloo): ranks seeded differently must end AutoInit with identical weights.

Usage: python autoinit_ddp.py OUT_DIR. Every rank compares all ranks' weights right after AutoInit (before DDP
broadcasts rank zero's); a difference raises, failing the run. Rank zero then writes OUT_DIR/ok.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_bn.callbacks.auto_init import AutoInit
from tests.helpers import BoringClassifier, mlp


class DivergeRng(Callback):
    """Give each rank its own global RNG state before AutoInit runs, as unseeded processes would have."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)


class AssertSameWeights(Callback):
    """Right after AutoInit, compare the flattened weights of all ranks."""

    def setup(self, trainer, pl_module, stage):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        difference = (gathered[0] - gathered[1]).abs().max().item()
        if difference != 0:
            raise AssertionError(f"ranks differ after AutoInit by {difference}")


def main(out_dir: str) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        logger=False,
        callbacks=[DivergeRng(), AutoInit(), AssertSameWeights()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringClassifier(mlp(3, 16, nn.GELU)))
    if trainer.is_global_zero:
        Path(out_dir, "ok").write_text("identical")


if __name__ == "__main__":
    main(sys.argv[1])
