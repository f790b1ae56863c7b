"""Monitor: the activation and gradient monitors outside the Trainer — a plain PyTorch loop or Lightning Fabric.

A thin driver of :class:`~lightning_bn.monitoring.MonitorEngine`, the engine of
:class:`~lightning_bn.ActivationMonitor` and :class:`~lightning_bn.GradientMonitor` too: the same options, defaults,
figures, tags and failures, driven by one call per optimizer step.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import torch
from torch import nn

from lightning_bn.checks import user_stacklevel
from lightning_bn.monitoring import ModuleFilter, MonitorEngine, MonitorOptions, is_rank_zero
from lightning_bn.monitoring.rows import DEFAULT_ZERO_TOL
from lightning_bn.report.plot import saturation_heatmap
from lightning_bn.tags import HEATMAP_TAG
from lightning_bn.tracing import ModelMap
from lightning_bn.writers import Destination

__all__ = ["Monitor"]


class Monitor:
    """Per-layer activation and gradient figures from any training loop: call :meth:`step` after each
    ``optimizer.step()``.

    Args:
        model: the module trained (a ``torch.compile``'d, Fabric- or DDP-wrapped model is fine: figures carry the
            plain model's names).
        every_n_steps: log on steps (counted by :meth:`step` from 0) that are multiples of this.
        writer: where figures go: a ``torch.utils.tensorboard.SummaryWriter`` (one event per step: the model-wide
            scalars and the per-layer figures as one compact record, see ``per_layer_scalars``; plus histograms, the
            layers table ``lightning-bn report`` reads and the saturation heatmap at :meth:`close`), a Lightning
            ``Fabric`` (``fabric.log_dict``, on its loggers), a Lightning logger (``log_metrics``), any callable
            ``(metrics, step)``, or ``None`` (kept in :attr:`figures` and returned by :meth:`step`).
        example_input: traced once to find every activation (functional calls too); default: the first call of
            ``model`` is traced as it runs (its ``forward`` runs once).
        **options: those of :class:`~lightning_bn.monitoring.MonitorOptions` (``activations``, ``gradients``,
            ``modules``, ``histograms``, ``gradient_histograms``, ``histogram_bins``, ``heatmap``, ``zero_tol``,
            ``fused``, ``norm_type``, ``update_ratio``, ``update_ratio_budget``, ``nonfinite_every_step``,
            ``per_layer_scalars``, ``attention``), with the same defaults as the callbacks. ``attention`` (default
            ``True``): figures of every attention call the trace found (``attn_logit_max``, ``attn_logit_rms``,
            ``attn_entropy``, ``attn_entropy_min``, one row per attention layer) and of the output logits of a
            cross-entropy loss (``out_logit_max``, ``out_log_z``), on logging steps only.
        optimizer: the optimizer, when it is Adam-type, so that each parameter's per-element RMS gradient is logged
            relative to its ``eps`` (``grad_rms_eps``, what the report's uniform-vanish rule reads).

    Raises:
        ValueError: naming the bad value (an option, a writer of no known kind, a ``modules`` entry that matches
            nothing).

    Every training forward pass between two :meth:`step` calls on a logging step is measured (all micro-batches of
    an accumulated step); passes under ``no_grad`` (evaluation, traces) are not. Under data parallelism every process
    must call :meth:`step`; the figures are exact over the global batch. Use it as a context manager (or call
    :meth:`close`) to remove its hooks; a closed monitor stays closed.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with Monitor(net, every_n_steps=2) as monitor:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         net(torch.randn(16, 4)).pow(2).mean().backward()
        ...         opt.step()
        ...         figures = monitor.step()
        >>> sorted(monitor.figures["act_std/1"])[0][0], "grad_norm/total" in monitor.figures
        (0, True)
    """

    def __init__(
        self,
        model: nn.Module,
        every_n_steps: int = 50,
        writer: Any = None,
        *,
        example_input: Any = None,
        activations: bool = True,
        gradients: bool = True,
        modules: ModuleFilter = None,
        histograms: bool = True,
        gradient_histograms: bool = False,
        histogram_bins: int = 64,
        heatmap: bool = True,
        zero_tol: float = DEFAULT_ZERO_TOL,
        fused: str = "auto",
        norm_type: float = 2.0,
        update_ratio: bool | str = True,
        update_ratio_budget: float = 0.25,
        nonfinite_every_step: bool = True,
        per_layer_scalars: bool = False,
        attention: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        options = MonitorOptions(every_n_steps, activations, gradients, modules, histograms, gradient_histograms,
                                 histogram_bins, heatmap, zero_tol, fused, norm_type, update_ratio,
                                 update_ratio_budget, nonfinite_every_step, per_layer_scalars, attention)  # fmt: skip
        self._destination = Destination.of_writer(writer, per_layer_scalars)
        self.engine = MonitorEngine(options, "Monitor", warn=self._warn)
        self.optimizer = optimizer
        self.model = model
        self.every_n_steps = every_n_steps
        #: steps ended so far (the number of the next one)
        self.global_step = 0
        self.engine.start(model, example_input, tensorboard=bool(self._destination.tensorboard))
        if is_rank_zero():
            self._destination.register(self.engine.layout())
        self._layers_written = False
        self.engine.begin(0, snapshot=True)

    @staticmethod
    def _warn(message: str) -> None:
        if is_rank_zero():
            warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())

    @property
    def figures(self) -> dict[str, deque[tuple[int, float]]]:
        """Every figure logged: tag -> ``[(step, value)]``, the latest logged steps."""
        return self.engine.figures

    @property
    def model_map(self) -> ModelMap | None:
        """The trace of the model, once known."""
        return self.engine.model_map

    @property
    def layers(self) -> list[dict[str, Any]] | None:
        """The watched layers in forward order (the layers table the report reads), once known."""
        return self.engine.layers

    def due(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the current one) is a logging step."""
        return (self.global_step if step is None else step) % self.every_n_steps == 0

    def step(self, loss: torch.Tensor | float | None = None) -> dict[str, float] | None:
        """End the current step (call it after ``optimizer.step()``): on a logging step, collect its figures (one
        transfer), write them and return them; then get ready for the next step. ``None`` on other steps.

        ``loss``, the step's training loss (a tensor stays on the device until that transfer), is logged on logging
        steps with the gradient figures: the report's ``stalled`` tells a converged net from a starved one by it.

        Raises:
            RuntimeError: after :meth:`close`.
        """
        engine, step = self.engine, self.global_step
        engine._check_open()
        try:
            engine.watch_nonfinite(step)
            engine.measure_gradients(step, optimizer=self.optimizer)
            result = engine.end(loss)
            if result is not None and is_rank_zero():
                if not self._layers_written and engine.layers is not None:
                    self._destination.write_layers(engine.layers)
                    self._layers_written = True
                self._destination.publish(result.metrics, result.histograms, result.step)
            return result.metrics if result is not None else None
        finally:  # a writer that raises does not shift the steps that follow
            self.global_step = step + 1
            engine.begin(self.global_step, snapshot=True)

    def close(self) -> None:
        """Write the saturation heatmap (TensorBoard), remove every hook and drop what an unfinished step holds; for
        good (a later :meth:`step` raises)."""
        if self.engine.closed:
            return
        self.engine.close()
        grid = self.engine.heatmap()
        if grid is not None and self._destination.tensorboard and is_rank_zero():
            self._destination.image(HEATMAP_TAG, saturation_heatmap(*grid), grid[1][-1])

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

