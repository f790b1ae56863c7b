"""Shared plumbing of the monitoring callbacks: argument checks, the logging cadence and its resumable state."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_bn import writers


def check_every_n_steps(every_n_steps: Any) -> int:
    """Raises ``MisconfigurationException`` naming the value unless it is a positive int."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise MisconfigurationException(f"Expected `every_n_steps` to be a positive integer but got {every_n_steps!r}")
    return every_n_steps


def check_positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MisconfigurationException(f"Expected `{name}` to be an integer >= {low} but got {value!r}")
    return value


class PeriodicMonitor(Callback):
    """A callback that does its work on optimizer steps that are multiples of ``every_n_steps``, once per step.

    On every other step the cost is one integer comparison. The last logged step is saved in checkpoints so a
    resumed run neither repeats nor skips a logging step. State that belongs to one fit is reset in ``setup`` (before a
    checkpoint is restored), so the same instance works for a second ``Trainer.fit``; whatever a subclass attached is
    removed on an exception and at teardown (:meth:`_release`).
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self._last_logged_step = -1
        #: every figure this fit logged (rank zero): tag -> ``[(step, value)]``, the latest ``writers.HISTORY`` steps
        self.figures: dict[str, deque[tuple[int, float]]] = {}

    def _reset(self) -> None:
        """Forget what belongs to the previous fit (subclasses extend it)."""
        self._release()
        self._last_logged_step = -1
        self.figures = {}

    def _remember(self, metrics: Mapping[str, float], step: int) -> None:
        """Keep the figures just logged for HealthCheck."""
        writers.remember(self.figures, metrics, step)

    def _release(self) -> None:
        """Remove every hook and drop every tensor this callback holds (subclasses implement it)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()
            self._warn_if_no_logger(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def _due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        return step % self.every_n_steps == 0 and step != self._last_logged_step

    def _warn_if_no_logger(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:
            rank_zero_warn(
                f"`{type(self).__name__}` found no logger in the Trainer; its figures go nowhere. "
                "Pass a logger such as `TensorBoardLogger` to the Trainer.",
                category=RuntimeWarning,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self._last_logged_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged_step = state_dict.get("last_logged_step", -1)
