"""Monitor: the activation and gradient monitors outside the Trainer — a plain PyTorch loop or Lightning Fabric.

The same engine as :class:`~lightning_bn.ActivationMonitor` and :class:`~lightning_bn.GradientMonitor` (one trace of
the model, :class:`~lightning_bn.probes.ActivationProbe` for the activations,
:class:`~lightning_bn.probes.GradientProbe` for the parameters), the same figures under the same tags, driven by one
call per optimizer step.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_bn import writers
from lightning_bn.fused import BACKENDS
from lightning_bn.probes import ActivationProbe, GradientProbe, ModuleFilter, validate_module_filter, watch_targets
from lightning_bn.probes.activation import STATISTICS, layer_entry
from lightning_bn.report.layers import LAYERS_TAG
from lightning_bn.stats import DEFAULT_ZERO_TOL
from lightning_bn.tracing import ModelMap, trace_model

__all__ = ["Monitor"]


class Monitor:
    """Per-layer activation and gradient figures from any training loop: call :meth:`step` after each
    ``optimizer.step()``.

    Args:
        model: the module trained.
        every_n_steps: log on steps (counted by :meth:`step` from 0) that are multiples of this.
        writer: where figures go: a ``torch.utils.tensorboard.SummaryWriter`` (scalars as one event per step, plus
            histograms, the Custom Scalars layout and the layers table ``lightning-bn report`` reads), a Lightning
            ``Fabric`` (``fabric.log_dict``, on its loggers), a Lightning logger (``log_metrics``), any callable
            ``(metrics, step)``, or ``None`` (kept in :attr:`figures` and returned by :meth:`step`).
        example_input: traced once to find every activation (functional calls too); default: the first call of
            ``model`` is traced on its real input.
        activations: watch activations (ActivationMonitor's figures).
        gradients: watch parameters (GradientMonitor's figures: ``grad_norm``, ``weight_norm``, ``update_ratio``).
        modules, histograms, histogram_bins, zero_tol, fused: as for :class:`~lightning_bn.ActivationMonitor`.
        norm_type, update_ratio, update_ratio_budget: as for :class:`~lightning_bn.GradientMonitor`.

    Raises:
        ValueError: naming the bad value (an ``every_n_steps`` that is no positive integer, an unknown ``fused``, a
            bad ``modules`` entry, a writer of no known kind).

    Under data parallelism the figures are exact over the global batch where a process group exists (activations:
    two all-reduces per logging step; sharded parameters: one): every process must call :meth:`step`. Hooks are
    attached only for logging steps; use it as a context manager (or call :meth:`close`) to remove them.

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
        histogram_bins: int = 64,
        zero_tol: float = DEFAULT_ZERO_TOL,
        fused: str = "auto",
        norm_type: float = 2.0,
        update_ratio: bool | str = True,
        update_ratio_budget: float = 0.25,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"Expected `every_n_steps` to be a positive integer but got {every_n_steps!r}")
        if fused not in BACKENDS:
            raise ValueError(f"Expected `fused` to be one of {list(BACKENDS)} but got {fused!r}")
        if update_ratio not in (True, False, "all"):
            raise ValueError(f"Expected `update_ratio` to be True, False or 'all' but got {update_ratio!r}")
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
            raise ValueError(f"Expected `norm_type` to be a positive number but got {norm_type!r}")
        validate_module_filter(modules)
        self.model = model
        self.every_n_steps = every_n_steps
        self._sink = _sink(writer)
        self._tensorboard = writer if _is_summary_writer(writer) else None
        self.modules, self.zero_tol, self.fused = modules, float(zero_tol), fused
        self.histogram_bins = histogram_bins if histograms and self._tensorboard is not None else 0
        #: every figure logged: tag -> ``[(step, value)]``, the latest ``writers.HISTORY`` logged steps
        self.figures: dict[str, deque[tuple[int, float]]] = {}
        #: the trace of the model (once known)
        self.model_map: ModelMap | None = None
        #: the watched layers in forward order (the layers table the report reads), once known
        self.layers: list[dict[str, Any]] | None = None
        self.global_step = 0
        self._activations = activations
        self._probe: ActivationProbe | None = None
        self._first_call: Any = None
        self._gradients = (
            GradientProbe(model.named_parameters(), norm_type, update_ratio, update_ratio_budget, self.histogram_bins)
            if gradients
            else None
        )
        if self._tensorboard is not None:
            layout = [STATISTICS[k] for k in ("std", "mean", "saturation", "dead", "zero", "max", "min", "nonfinite")]
            if activations:
                writers.write_layout([self._tensorboard], "lightning-bn: activations", layout)
            if gradients:
                writers.write_layout(
                    [self._tensorboard], "lightning-bn: gradients", ["grad_norm", "update_ratio", "weight_norm"]
                )
        if activations:
            if example_input is not None:
                self._build(trace_model(model, example_input))
            else:
                self._first_call = model.register_forward_pre_hook(self._trace_first_call, with_kwargs=True)
        self._arm()

    # ------------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and drop what an unfinished step holds."""
        if self._probe is not None:
            self._probe.detach()
        if self._first_call is not None:
            self._first_call.remove()
            self._first_call = None
        if self._gradients is not None:
            self._gradients.reset()

    def due(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the current one) is a logging step."""
        return (self.global_step if step is None else step) % self.every_n_steps == 0

    def _arm(self) -> None:
        """Before the forward pass of a logging step: hooks on, and the weights copied for the update ratio."""
        if not self.due():
            return
        if self._probe is not None:
            self._probe.attach()
        if self._gradients is not None:
            self._gradients.snapshot()

    def _build(self, found: ModelMap | None) -> None:
        self.model_map = found
        targets = watch_targets(self.model, found, self.modules)
        if not targets:
            raise ValueError(f"Expected `modules={self.modules!r}` to select some module of the model")
        self._probe = ActivationProbe(targets, self.histogram_bins, self.zero_tol, self.fused)
        self.layers = [layer_entry(t) for t in targets]
        if self._tensorboard is not None:
            writers.log_text([self._tensorboard], LAYERS_TAG, json.dumps(self.layers), step=0)

    def _trace_first_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._first_call.remove()
        self._first_call = None
        try:
            found = trace_model(module, kwargs if kwargs and not args else args)
        except ValueError:
            found = None  # activation modules only
        self._build(found)
        if self.due():
            self._probe.attach()  # this very call is the first logging step's forward pass

    # ------------------------------------------------------------------------------------------------ the step
    def step(self) -> dict[str, float] | None:
        """End the current step (call it after ``optimizer.step()``): on a logging step, collect its figures (one
        transfer per kind), write them and return them; then get ready for the next step. ``None`` on other steps."""
        step = self.global_step
        metrics: dict[str, float] | None = None
        histograms: list[tuple[str, list[dict[str, Any]]]] = []
        if self.due(step):
            metrics = {}
            if self._probe is not None and self._probe.attached:
                self._probe.detach()
                result = self._probe.collect()
                metrics.update(result.metrics())
                histograms.append(("act_hist", result.histograms))
            if self._gradients is not None:
                self._gradients.measure(step)
                grads = self._gradients.collect()
                if grads is not None:
                    metrics.update(grads.metrics)
                    histograms.append(("grad_hist", grads.histograms))
            self._write(metrics, histograms, step)
        self.global_step = step + 1
        self._arm()
        return metrics

    def _write(self, metrics: dict[str, float], histograms: list, step: int) -> None:
        writers.remember(self.figures, metrics, step)
        if not _is_rank_zero():
            return
        if metrics and self._sink is not None:
            self._sink(metrics, step)
        if self._tensorboard is not None:
            for prefix, found in histograms:
                if found:
                    writers.log_histograms([self._tensorboard], prefix, found, step)


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _is_summary_writer(writer: Any) -> bool:
    return hasattr(writer, "_get_file_writer") and hasattr(writer, "add_scalar")


def _sink(writer: Any) -> Callable[[Mapping[str, float], int], None] | None:
    """How figures reach ``writer``; raises ``ValueError`` naming it when it is of no known kind."""
    if writer is None:
        return None
    if _is_summary_writer(writer):
        return lambda metrics, step: writers.write_scalars(writer, metrics, step)
    if hasattr(writer, "log_dict"):  # Lightning Fabric: every logger it holds
        return lambda metrics, step: writer.log_dict(dict(metrics), step=step)
    if hasattr(writer, "log_metrics"):  # a Lightning logger
        return lambda metrics, step: writer.log_metrics(dict(metrics), step=step)
    if callable(writer):
        return lambda metrics, step: writer(dict(metrics), step)
    raise ValueError(
        "Expected `writer` to be a SummaryWriter, a Lightning Fabric, a Lightning logger, a callable "
        f"(metrics, step) or None but got {type(writer).__name__}"
    )
