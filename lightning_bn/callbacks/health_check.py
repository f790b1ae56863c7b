"""HealthCheck: the report's rules applied while training — a table of the flagged layers at fit end, and an opt-in
fail-fast that stops training the way ``EarlyStopping`` does."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_bn.callbacks._periodic import MonitorCallback, checked
from lightning_bn.report import FLAGS, RunHealth, Thresholds, analyze
from lightning_bn.report.formatting import format_table
from lightning_bn.report.health import ADVICE
from lightning_bn.tags import ATTENTION_STATISTICS, OUTPUT_STATISTICS, split_tag

__all__ = ["HealthCheck"]

#: the statistics judged against their value at the first logged step (attention entropy, log Z: see
#: :func:`lightning_bn.report.analyze`): their first point is kept for the judgement on a window of recent steps
_BASELINE_STATISTICS = frozenset(ATTENTION_STATISTICS.values()) | frozenset(OUTPUT_STATISTICS.values())


class HealthCheck(Callback):
    """Judge what :class:`~lightning_bn.ActivationMonitor` and :class:`~lightning_bn.GradientMonitor` log with the
    rules of ``lightning-bn report`` (:class:`lightning_bn.report.Thresholds`), while training.

    Args:
        stop_on: flags that stop training (``trainer.should_stop``, as ``EarlyStopping`` does) at the first logging
            step where one holds on some layer, with a warning naming the layer, the figure and what to try; any of
            ``"saturated"``, ``"dead"``, ``"nonfinite"``, ``"vanishing"``, ``"exploding"``, ``"vanishing_gradient"``,
            ``"exploding_gradient"``, ``"stalled"``, ``"attention_logit_growth"``, ``"attention_entropy_collapse"``,
            ``"output_logit_divergence"`` (the last three on the attention and output-logit figures
            ``ActivationMonitor`` logs for transformers), or ``"all"``. Empty (default) or ``None``: never stop. A run
            resumed from a checkpoint judges again (the earlier stops are kept in :attr:`previous_stops`; the
            starting values the attention entropy and log Z are compared with are then those of the resumed fit).
        summary: at fit end, print (rank zero) the report of the run: the flagged layers with the step each problem
            started, the healthy ones by type, and advice per flag.
        thresholds: when a layer is flagged (default: the report's defaults).

    The figures come from the monitors in the same Trainer (their host-side copy of what they logged; no extra device
    work). Put ``HealthCheck`` after them in ``callbacks``; placed before, it judges a logging step one step later.
    Under DDP the decision is made on rank zero (where the monitors log) and broadcast at the start of the step after
    each logging step only, so every rank stops at the same step (one step later than on one process).

    Example::

        >>> from lightning_bn import ActivationMonitor, GradientMonitor, HealthCheck
        >>> callbacks = [ActivationMonitor(every_n_steps=50), GradientMonitor(every_n_steps=50),
        ...              HealthCheck(stop_on=("nonfinite", "dead"))]
        >>> callbacks[-1].stop_on
        ('nonfinite', 'dead')
    """

    def __init__(
        self,
        stop_on: Sequence[str] | str | None = (),
        summary: bool = True,
        thresholds: Thresholds | None = None,
    ) -> None:
        names = checked(_stop_flags, stop_on)
        if not isinstance(summary, bool):
            raise MisconfigurationException(f"Expected `summary` to be a bool but got {summary!r}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise MisconfigurationException(
                f"Expected `thresholds` to be a lightning_bn.report.Thresholds but got {thresholds!r}"
            )
        self.stop_on: tuple[str, ...] = names
        self.summary = summary
        self.thresholds = thresholds or Thresholds()
        #: after a stop in this fit: ``(step, flag, layer, reason)``
        self.stopped: tuple[int, str, str, str] | None = None
        #: the stops of the fits a checkpoint resumed (history: a resumed run judges again, and stops at a new problem)
        self.previous_stops: list[tuple[int, str, str, str]] = []
        #: the last analysis (fit end, or the logging step that stopped training)
        self.health: RunHealth | None = None
        self._monitors: list[MonitorCallback] = []
        self._judged = -1
        self._first: dict[str, tuple[int, float]] = {}  # tag -> its first logged point (_BASELINE_STATISTICS)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stop_on=self.stop_on)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._monitors = [cb for cb in trainer.callbacks if isinstance(cb, MonitorCallback)]
        self.stopped, self.health, self._judged = None, None, -1
        self._first = {}
        if not self._monitors:
            rank_zero_warn(
                "`HealthCheck` found no ActivationMonitor or GradientMonitor in the Trainer's callbacks; it has "
                "nothing to judge. Add them before it: "
                "callbacks=[ActivationMonitor(), GradientMonitor(), HealthCheck()]",
                category=RuntimeWarning,
            )

    def _figures(self, window: int | None = None) -> dict[str, list[tuple[int, float]]]:
        """Every monitor's figures; with ``window``, only each tag's latest ``window`` logged steps, and the first
        logged point of the figures judged against their starting value (kept here: the monitors keep the latest
        steps only)."""
        out: dict[str, list[tuple[int, float]]] = {}
        for monitor in self._monitors:
            for tag, series in monitor.figures.items():
                start = max(len(series) - window, 0) if window is not None else 0
                out[tag] = list(itertools.islice(series, start, None))
                if series and split_tag(tag)[0] in _BASELINE_STATISTICS:
                    first = self._first.setdefault(tag, series[0])
                    if out[tag][0][0] > first[0]:
                        out[tag].insert(0, first)
        return out

    def _layers(self) -> list[dict[str, Any]] | None:
        return next((m.layers for m in self._monitors if m.layers is not None), None)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._check(trainer, distributed=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size == 1:
            self._check(trainer, distributed=False)

    def _check(self, trainer: pl.Trainer, distributed: bool) -> None:
        if not self.stop_on or not self._monitors or self.stopped is not None:
            return
        found = None
        latest = max(m.last_logged_step for m in self._monitors)  # one comparison per step, no scan of the figures
        if latest > self._judged and trainer.is_global_zero:  # new figures (rank zero: the others log nothing)
            self._judged = latest
            found = self._judge(latest)
        if distributed and trainer.world_size > 1:
            # every rank takes part, on the steps right after a logging step only (the same on every rank)
            previous = trainer.global_step - 1
            if previous < 0 or not any(previous % m.every_n_steps == 0 for m in self._monitors):
                return
            found = trainer.strategy.broadcast(found, src=0)
        if found is not None:
            self._stop(trainer, found)

    def _judge(self, latest: int) -> tuple[int, str, str, str] | None:
        """The first ``stop_on`` flag that holds at the latest logged step, judged on a short window of steps."""
        window = max(self.thresholds.stalled_steps, self.thresholds.attention_logit_window) + 1
        health = analyze(self._figures(window), thresholds=self.thresholds, layers=self._layers())
        for flag in FLAGS:
            if flag not in self.stop_on:
                continue
            for layer in health.layers:
                hit = layer.flags.get(flag)
                if hit is not None and hit.active:
                    self.health = health
                    return latest, flag, layer.name, hit.reason
        return None

    def _stop(self, trainer: pl.Trainer, found: tuple[int, str, str, str]) -> None:
        step, flag, layer, reason = found
        self.stopped = (step, flag, layer, reason)
        trainer.should_stop = True
        rank_zero_warn(
            f"HealthCheck: stopping training at step {step}: {layer} is {flag} ({reason}). Try: {ADVICE[flag]}. "
            f"(HealthCheck(stop_on={list(self.stop_on)!r}))",
            category=RuntimeWarning,
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.summary and self._monitors and trainer.is_global_zero):
            return
        figures = self._figures()
        if not figures:
            return
        self.health = analyze(figures, "this fit", self.thresholds, self._layers())
        rank_zero_info("lightning-bn health at fit end\n" + format_table([self.health], [], self.thresholds))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stopped": list(self.stopped) if self.stopped else None,
            "previous_stops": [list(stop) for stop in self.previous_stops],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # what is restored is history, not the decision to stay silent: the resumed run is judged again
        stops = [tuple(stop) for stop in state_dict.get("previous_stops", [])]
        stopped = state_dict.get("stopped")
        self.previous_stops = stops + ([tuple(stopped)] if stopped else [])  # type: ignore[list-item]
        self.stopped = None


def _stop_flags(stop_on: Any) -> tuple[str, ...]:
    """The flags of ``stop_on``: one flag name, a collection of them, ``"all"``, or ``None`` / empty (never stop).

    Raises:
        ValueError: naming the bad value.
    """
    if stop_on is None:
        return ()
    if isinstance(stop_on, str):
        names: tuple[Any, ...] = (stop_on,)
    elif isinstance(stop_on, (Sequence, set, frozenset)):
        names = tuple(stop_on)
    else:
        raise ValueError(
            f"Expected `stop_on` to be a flag name, a sequence of flag names among {list(FLAGS)}, 'all' or None "
            f"but got {stop_on!r}"
        )
    if "all" in names:
        return tuple(FLAGS)
    unknown = [name for name in names if not isinstance(name, str) or name not in FLAGS]
    if unknown:
        raise ValueError(f"Expected `stop_on` to name flags among {list(FLAGS)} or 'all' but got {unknown[0]!r}")
    return names
