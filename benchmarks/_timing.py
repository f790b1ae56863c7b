"""Step timing shared by the benchmarks: a callback pair that times each training batch, and a robust step time.

Put ``timer`` first and ``timer.stop`` last among the callbacks, so the window opens before every other callback's
``on_train_batch_start`` and closes after every ``on_train_batch_end``. A run's step time is the median of its
logging steps and the median of its other steps, weighted 1/n and 1 - 1/n: robust to a busy machine, yet the logging
steps count at their real frequency.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

WARMUP_STEPS = 10


def _drain(pl_module: pl.LightningModule) -> None:
    """On CUDA, wait for queued kernels so a step's wall time holds its own GPU work (same in every configuration)."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class StepTimer(Callback):
    """Wall time of each training batch, from the first ``on_train_batch_start`` to the last ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []  # (global step, seconds)
        self._start = 0.0
        self.stop = _StopTimer(self)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        _drain(pl_module)
        self._start = time.perf_counter()


class _StopTimer(Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        _drain(pl_module)
        self.timer.times.append((trainer.global_step - 1, time.perf_counter() - self.timer._start))


def step_time(times: list[tuple[int, float]], every_n_steps: int | None, phase: int | None = 0) -> float:
    """Amortized step time: medians of logging and other steps, weighted by frequency.

    Args:
        times: ``(global step, seconds)`` per step, warm-up excluded.
        every_n_steps: logging period; ``None`` or 1 takes the plain median.
        phase: logging steps are those with ``step % every_n_steps == phase``; ``None`` takes the residue whose
            median is slowest (for tools that count their own calls, such as ``wandb.watch``). A wrong guess costs at
            most 1/n of the noise, since that residue is weighted 1/n.
    """
    if every_n_steps is None or every_n_steps == 1:
        return statistics.median(t for _, t in times)
    by_phase: dict[int, list[float]] = defaultdict(list)
    for step, t in times:
        by_phase[step % every_n_steps].append(t)
    if phase is None:
        phase = max(by_phase, key=lambda k: statistics.median(by_phase[k]))
    logging_steps = by_phase[phase]
    if not logging_steps:
        raise ValueError(f"Expected a logging step among the measured steps but got none for every_n={every_n_steps}")
    other_steps = [t for k, values in by_phase.items() if k != phase for t in values]
    share = 1 / every_n_steps
    return share * statistics.median(logging_steps) + (1 - share) * statistics.median(other_steps)
