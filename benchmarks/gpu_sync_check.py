"""GPU check: the monitors cause no host synchronization on steps that do not log, and one transfer per callback
on a logging step.

Needs a CUDA device (not part of the test suite). The data lives on the GPU and the model logs nothing itself, so
any synchronization seen comes from Lightning's loop or from our callbacks; a baseline run without the callbacks
tells them apart. Uses ``torch.cuda.set_sync_debug_mode``: "warn" on every step, counting the warnings per step.

Usage: python benchmarks/gpu_sync_check.py [--steps 20] [--every 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(512, 512), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(512, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SyncCounter:
    """Counts synchronizing CUDA calls from batch start to batch end, around every other callback.

    Lightning calls callbacks in list order for every hook, so ``start`` goes first in the list and ``end`` last.
    """

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self.where: dict[int, list[str]] = {}
        self.start, self.end = self._Start(self), self._End(self)

    class _Start(Callback):
        def __init__(self, counter: SyncCounter) -> None:
            self.counter = counter

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.counter.step = trainer.global_step
            self.counter.catcher = warnings.catch_warnings(record=True)
            self.counter.records = self.counter.catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    class _End(Callback):
        def __init__(self, counter: SyncCounter) -> None:
            self.counter = counter

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")
            self.counter.catcher.__exit__(None, None, None)
            syncs = [w for w in self.counter.records if "synchroniz" in str(w.message).lower()]
            self.counter.per_step[self.counter.step] = len(syncs)
            self.counter.where[self.counter.step] = [f"{w.filename}:{w.lineno}" for w in syncs]


def run(callbacks: list[Callback], steps: int, tmp: str) -> tuple[dict[int, int], dict[int, list[str]]]:
    torch.manual_seed(0)
    n = 256 * steps
    data = TensorDataset(torch.randn(n, 512, device="cuda"), torch.randint(0, 10, (n,), device="cuda"))
    counter = SyncCounter()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=steps,
        logger=CSVLogger(tmp),
        callbacks=[counter.start, *callbacks, counter.end],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Model(), DataLoader(data, batch_size=256))
    return counter.per_step, counter.where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = run([], args.steps, tmp)
        monitored, where = run(
            [ActivationMonitor(every_n_steps=args.every), GradientMonitor(every_n_steps=args.every)], args.steps, tmp
        )
    logging = [s for s in monitored if s % args.every == 0]
    quiet = [s for s in monitored if s % args.every != 0]
    extra_quiet = {s: monitored[s] - base.get(s, 0) for s in quiet}
    extra_logging = {s: monitored[s] - base.get(s, 0) for s in logging}
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "baseline_syncs_per_step": base,
                "monitored_syncs_per_step": monitored,
                "extra_syncs_non_logging_steps": extra_quiet,
                "extra_syncs_logging_steps": extra_logging,
            },
            indent=1,
        )
    )
    print("where the logging step syncs:", where.get(args.every, []))
    print("max extra syncs on non-logging steps:", max(extra_quiet.values(), default=0))
    print("extra syncs on logging steps:", sorted(set(extra_logging.values())))


if __name__ == "__main__":
    main()
