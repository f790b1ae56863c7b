"""Overhead of ActivationMonitor + GradientMonitor: training step time against the same training without them.

One process, configurations interleaved (baseline, every_n_steps=50, every_n_steps=1, baseline, ...) so drift in
the machine's speed hits all of them alike. Each run is a real ``Trainer.fit`` of a CPU MLP on synthetic data with
the same TensorBoard logger; only the callbacks differ. A run's step time is the median of its logging steps and
the median of its other steps, weighted 1/n and 1 - 1/n (robust to a busy machine, yet the logging steps count at
their real frequency); the table shows the median over repetitions and the spread of the ratio::

    python benchmarks/overhead.py --reps 5 --steps 150

Targets: <= 1.03x at ``every_n_steps=50`` and <= 1.25x at ``every_n_steps=1``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from _timing import WARMUP_STEPS, StepTimer, step_time  # the script's directory is on sys.path
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor

TARGETS = {50: 1.03, 1: 1.25}


class MLP(pl.LightningModule):
    def __init__(self, features: int, width: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(features if i == 0 else width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, classes))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def monitors(every_n_steps: int, histograms: bool | None = None) -> Callable[[], list[Callback]]:
    """Both monitors; ``histograms=None`` keeps each monitor's default (activation histograms on, gradient off)."""

    def make() -> list[Callback]:
        if histograms is None:
            return [ActivationMonitor(every_n_steps=every_n_steps), GradientMonitor(every_n_steps=every_n_steps)]
        return [
            ActivationMonitor(every_n_steps=every_n_steps, histograms=histograms),
            GradientMonitor(every_n_steps=every_n_steps, histograms=histograms),
        ]

    return make


# name -> (every_n_steps, callbacks); baseline first
CONFIGS: dict[str, tuple[int | None, Callable[[], list[Callback]]]] = {
    "baseline (no monitors)": (None, list),
    "every_n=50, defaults": (50, monitors(50)),
    "every_n=50, no histograms": (50, monitors(50, histograms=False)),
    "every_n=50, all histograms": (50, monitors(50, histograms=True)),
    "every_n=1, defaults": (1, monitors(1)),
    "every_n=1, no histograms": (1, monitors(1, histograms=False)),
    "every_n=1, all histograms": (1, monitors(1, histograms=True)),
}


def run_once(config: tuple[int | None, Callable[[], list[Callback]]], data: TensorDataset, args: Any) -> float:
    """Step time (seconds) of one fit, warm-up steps excluded."""
    every_n_steps, make_callbacks = config
    torch.manual_seed(0)
    model = MLP(data.tensors[0].shape[1], args.width, args.depth)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_steps=WARMUP_STEPS + args.steps,
            logger=TensorBoardLogger(logdir, name="", version=0),
            log_every_n_steps=50,
            callbacks=[timer, *make_callbacks(), timer.stop],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, DataLoader(data, batch_size=args.batch_size))
    return step_time(timer.times[WARMUP_STEPS:], every_n_steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each configuration")
    parser.add_argument("--steps", type=int, default=150, help="measured steps per run (after warm-up)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu (GPU step times include a sync per step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # one epoch covers the whole run, so no epoch-end work (the heatmap) falls between measured steps
    n = args.batch_size * (WARMUP_STEPS + args.steps)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, args.features, generator=g), torch.randint(0, 10, (n,), generator=g))

    print(
        f"MLP {args.features}-{'-'.join([str(args.width)] * args.depth)}-10, batch {args.batch_size}, "
        f"{args.steps} measured steps after {WARMUP_STEPS} warm-up, {args.reps} reps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.accelerator}"
    )
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    start = time.perf_counter()
    for _ in range(args.reps):
        for name, config in CONFIGS.items():
            times[name].append(run_once(config, data, args))

    base = statistics.median(times["baseline (no monitors)"])
    print(f"\n{'config':<28} {'median step ms':>14} {'ratio':>7}  {'min..max ratio':>15}")
    for name, values in times.items():
        ratio = statistics.median(values) / base
        spread = f"{min(values) / base:.3f}..{max(values) / base:.3f}"
        print(f"{name:<28} {statistics.median(values) * 1e3:>14.2f} {ratio:>6.3f}x  {spread:>15}")
    print(f"\ntargets: <= {TARGETS[50]}x at every_n=50, <= {TARGETS[1]}x at every_n=1 (defaults)")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
