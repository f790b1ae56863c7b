"""Where a logging step's time goes: cProfile of a short fit with both monitors at ``every_n_steps=1``.

python benchmarks/profile_monitors.py [--accelerator gpu] [--steps 60]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from overhead import MLP
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--logdir", default="/tmp/lightning_bn_profile")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n = 256 * args.steps
    data = TensorDataset(torch.randn(n, 256), torch.randint(0, 10, (n,)))

    def fit(callbacks: list) -> None:
        trainer = pl.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_steps=args.steps,
            callbacks=callbacks,
            logger=TensorBoardLogger(args.logdir),
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(MLP(256, 512, 4), DataLoader(data, batch_size=256))

    fit([])  # warm-up: kernels, allocator, imports
    profiler = cProfile.Profile()
    profiler.enable()
    fit([ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)])
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
