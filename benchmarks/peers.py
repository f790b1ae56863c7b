"""What ``benchmarks/run.py`` compares the monitors with: the common hand-written hooks, wandb.watch, bolts.

Each peer is optional: ``available()`` says whether it imports here and, when it does not, why (one line).
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

HOOKED_TYPES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.GELU)


class LightningGradNorm(Callback):
    """Lightning's own recipe: ``lightning.pytorch.utilities.grad_norm`` in ``on_before_optimizer_step`` and
    ``pl_module.log_dict`` of the per-parameter norms and the total, every step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        from lightning.pytorch.utilities import grad_norm

        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class HandWrittenStats(Callback):
    """The pattern found in many training scripts: forward hooks on every Linear/Conv/ReLU/GELU call ``.item()`` on
    the output's mean and std on every step, and the step's figures go to ``trainer.logger.log_metrics``."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.handles: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.handles = [
            module.register_forward_hook(partial(self._record, name))
            for name, module in pl_module.named_modules()
            if isinstance(module, HOOKED_TYPES)
        ]

    def _record(self, name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training:
            self.values[f"mean/{name}"] = output.mean().item()
            self.values[f"std/{name}"] = output.std().item()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        trainer.logger.log_metrics(self.values, step=trainer.global_step)
        self.values = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()


def wandb_status() -> str | None:
    """``None`` when wandb imports, else why not."""
    try:
        import wandb
    except Exception as err:  # any import failure means "not measurable here"
        return f"`import wandb` failed: {type(err).__name__}: {err}"
    return None if hasattr(wandb, "watch") else "this wandb has no `watch`"


def bolts_status() -> str | None:
    """``None`` when lightning-bolts' ``ModuleDataMonitor`` imports, else why not."""
    try:
        from pl_bolts.callbacks import ModuleDataMonitor  # noqa: F401
    except Exception as err:
        return f"`from pl_bolts.callbacks import ModuleDataMonitor` failed: {type(err).__name__}: {err}"
    return None


def start_wandb() -> str:
    """One offline wandb run for the whole benchmark (every ``WandbLogger`` reuses it: no service start per fit)."""
    import wandb

    directory = tempfile.mkdtemp(prefix="lightning-bn-bench-wandb-")
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=directory, WANDB_SILENT="true")
    wandb.init(mode="offline", dir=directory, project="lightning-bn-bench")
    return directory


def wandb_logger() -> pl.loggers.Logger:
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(offline=True)


class WandbWatch(Callback):
    """``logger.watch(model, log="all", log_freq=n)`` at fit start and ``wandb.unwatch`` at fit end."""

    def __init__(self, log_freq: int) -> None:
        self.log_freq = log_freq

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.logger.watch(pl_module, log="all", log_freq=self.log_freq, log_graph=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import wandb

        wandb.unwatch(pl_module)


def bolts_monitor(every_n_steps: int) -> Callback:
    from pl_bolts.callbacks import ModuleDataMonitor

    return ModuleDataMonitor(submodules=True, log_every_n_steps=every_n_steps)
