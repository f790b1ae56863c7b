"""ActivationMonitor: per-layer activation statistics, logged every ``every_n_steps`` optimizer steps.

Logs ``act_mean``, ``act_std``, ``act_kurtosis``, ``act_min``, ``act_max``, ``act_zero``, ``act_nonfinite`` for every
watched module, ``act_saturation`` and ``act_dead`` for activations; with TensorBoard also histograms and a
saturation heatmap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_bn import writers
from lightning_bn.callbacks._periodic import PeriodicMonitor, check_positive_int
from lightning_bn.fused import BACKENDS, COMPILE_SECONDS
from lightning_bn.probes import ActivationProbe, ModuleFilter, validate_module_filter, watch_targets
from lightning_bn.probes.activation import STATISTICS, layer_entry
from lightning_bn.report.layers import LAYERS_TAG
from lightning_bn.report.plot import saturation_heatmap
from lightning_bn.stats import DEFAULT_ZERO_TOL
from lightning_bn.tracing import HookSet, ModelMap, trace_model

#: figure name (see :func:`lightning_bn.stats.figures`) -> logged statistic


def _is_compiled(module: object) -> bool:
    return type(module).__name__ == "OptimizedModule"  # torch._dynamo.eval_frame.OptimizedModule, a private path


class ActivationMonitor(PeriodicMonitor):
    r"""Log per-layer activation statistics: where signals vanish, explode, saturate or die.

    What is watched comes from one traced forward pass per fit (:func:`~lightning_bn.tracing.trace_model`, on
    ``example_input_array``, else on the first training batch's input to ``forward``): every activation, whether a
    module (``nn.ReLU``, transformers' ``NewGELUActivation``, found by what it computes), a call in ``forward``
    (``F.relu``, ``torch.tanh``, ``x.sigmoid()``: logged as ``<producing layer>.<kind>``, e.g. ``fc1.relu``) or inside
    a norm-act layer, and every leaf layer with a weight. Placeholders (``nn.Identity``, dropout, drop-path) are not
    activations. The map is kept as :attr:`model_map`.

    On a logging step, forward hooks on the watched modules reduce each output to a few numbers on the device;
    after the step all of them leave the device in one transfer (all-reduced first under DDP, so the figures are
    exact over the global batch). On other steps nothing is hooked.

    Saturation follows :mod:`lightning_bn.activations`: an element is saturated where the activation's derivative
    is below 1% of its maximum (sigmoid/tanh at an asymptote, ReLU below zero); a unit is dead when it is saturated
    for every sample of the batch (Glorot & Bengio 2010; He et al. 2015).

    Args:
        every_n_steps: log on optimizer steps that are multiples of this (step 0 included, i.e. the init).
        modules: which modules to watch: module types, glob patterns on qualified names (``"encoder.*"``), or a
            predicate ``(name, module) -> bool``; patterns also match activation site names (``"fc1.relu"``).
            Default: every activation and every leaf layer with weights.
        histograms: also write a histogram per module (TensorBoard only; rank-local under DDP).
        histogram_bins: bins per histogram.
        heatmap: write an image of saturation per activation layer over the logged steps at each epoch end
            (TensorBoard only).
        zero_tol: ``|x|`` at or below this counts towards ``act_zero``.
        fused: how the one fused pass per watched tensor runs: ``"auto"`` (compiled with ``torch.compile`` on CUDA,
            eager on CPU where building the C++ kernels costs more than it saves; ``LIGHTNING_BN_FUSED`` overrides),
            ``"compiled"`` or ``"eager"``. Both give the same figures; compiling takes seconds once per process
            (reported at the first log).

    Raises:
        MisconfigurationException: for a non-positive ``every_n_steps`` or ``histogram_bins``, a ``modules`` entry
            that is neither a type nor a pattern, or (at fit start) an entry that matches no module.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bn import ActivationMonitor
        >>> trainer = Trainer(callbacks=[ActivationMonitor(every_n_steps=50)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        modules: ModuleFilter = None,
        histograms: bool = True,
        histogram_bins: int = 64,
        heatmap: bool = True,
        zero_tol: float = DEFAULT_ZERO_TOL,
        fused: str = "auto",
    ) -> None:
        super().__init__(every_n_steps)
        if fused not in BACKENDS:
            raise MisconfigurationException(f"Expected `fused` to be one of {list(BACKENDS)} but got {fused!r}")
        self.fused = fused
        try:
            validate_module_filter(modules)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self.modules = modules
        self.histograms = histograms
        self.histogram_bins = check_positive_int("histogram_bins", histogram_bins)
        self.heatmap = heatmap
        if isinstance(zero_tol, bool) or not isinstance(zero_tol, (int, float)) or not 0 <= zero_tol < float("inf"):
            raise MisconfigurationException(f"Expected `zero_tol` to be a number >= 0 but got {zero_tol!r}")
        self.zero_tol = float(zero_tol)
        self._probe: ActivationProbe | None = None
        self._first_forward: _FirstForward | None = None
        self._compile_reported = False
        self.model_map: ModelMap | None = None
        self._pending_step: int | None = None
        self._history: list[tuple[int, dict[str, float]]] = []
        #: the watched layers in forward order (the layers table the report reads), once known
        self.layers: list[dict[str, Any]] | None = None

    @override
    def _reset(self) -> None:
        super()._reset()
        self._probe, self.model_map, self._history = None, None, []

    @override
    def _release(self) -> None:
        if self._probe is not None:
            self._probe.detach()
        if self._first_forward is not None:
            self._first_forward.detach()
            self._first_forward = None
        self._pending_step = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module)

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        validate_module_filter(self.modules)
        self._probe, self.model_map = None, None
        compiled = [name or "the LightningModule" for name, m in pl_module.named_modules() if _is_compiled(m)]
        if compiled:
            rank_zero_warn(
                f"ActivationMonitor: {compiled[0]!r} is torch.compile'd. On logging steps the monitor's hooks run "
                "eagerly (a graph break at each watched module) and dynamo may recompile when they are attached or "
                "removed; the figures stay exact. Raise `every_n_steps` to keep compiled speed on most steps.",
                category=RuntimeWarning,
            )
        example = pl_module.example_input_array
        if example is not None:
            example = trainer.precision_plugin.convert_input(move_data_to_device(example, pl_module.device))
            with trainer.precision_plugin.forward_context():
                self._build(trainer, pl_module, example, "example_input_array")
        if trainer.is_global_zero:
            layout = [STATISTICS[k] for k in ("std", "mean", "saturation", "dead", "zero", "max", "min", "nonfinite")]
            writers.write_layout(writers.tensorboard_writers(trainer.loggers), "lightning-bn: activations", layout)

    def _build(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        example: Any,
        where: str,
        found: ModelMap | None = None,
    ) -> None:
        """Build the probe from the map ``found``, or from a trace on ``example``, or (neither) from modules alone."""
        if found is not None:
            self.model_map = found
        elif example is not None:
            try:
                self.model_map = trace_model(pl_module, example)
            except ValueError as err:
                rank_zero_warn(
                    f"ActivationMonitor could not trace {type(pl_module).__name__} on {where} ({err}); it watches "
                    "activation modules only, not functional activations.",
                    category=RuntimeWarning,
                )
        try:
            targets = watch_targets(pl_module, self.model_map, self.modules)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        if not targets:
            raise MisconfigurationException(f"`ActivationMonitor(modules={self.modules!r})` selected no module")
        bins = self.histogram_bins if self.histograms and writers.tensorboard_writers(trainer.loggers) else 0
        self._probe = ActivationProbe(targets, histogram_bins=bins, zero_tol=self.zero_tol, fused=self.fused)
        self.layers = [layer_entry(t) for t in targets]
        if trainer.is_global_zero:
            table = json.dumps(self.layers)
            writers.log_text(writers.tensorboard_writers(trainer.loggers), LAYERS_TAG, table, step=0)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._finish(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_heatmap(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        self._pending_step = trainer.global_step
        if self._probe is None:
            # no example input: watch the activation modules now, and trace `forward` at its first call
            self._build(trainer, pl_module, None, "")
            self._first_forward = _FirstForward(self, trainer, pl_module)
            self._first_forward.attach()
        self._probe.attach()

    def _traced(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, args: tuple, kwargs: dict) -> None:
        """The first call of ``forward`` (``name == ""``) or of a top-level submodule: trace it on the same input."""
        module = pl_module.get_submodule(name)
        try:
            with self._probe.paused():  # the trace's own forward pass is no step of training
                found = trace_model(module, kwargs if kwargs and not args else args)
        except ValueError as err:
            rank_zero_warn(
                f"ActivationMonitor could not trace {type(module).__name__} on its first batch ({err}); it watches "
                "activation modules only, not functional activations.",
                category=RuntimeWarning,
            )
            return
        if not name:  # the whole model, before any of it ran: watch everything from this very call
            self._first_forward.detach()
            self._first_forward = None
            self._probe.detach()
            self._build(trainer, pl_module, None, "", found)
            self._probe.attach()
            return
        found = found.prefixed(name)
        self.model_map = found if self.model_map is None else self.model_map.merged(found)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first, self._first_forward = self._first_forward, None
        if first is not None:
            first.detach()
        self._log(trainer, self._probe)
        if first is not None and self.model_map is not None and first.parts:
            self._build(trainer, pl_module, None, "", self.model_map)  # submodules traced one by one: from now on

    def _log(self, trainer: pl.Trainer, probe: ActivationProbe) -> None:
        if self._pending_step is None:
            return
        step, self._pending_step = self._pending_step, None
        probe.detach()
        self._last_logged_step = step
        result = probe.collect()
        if COMPILE_SECONDS and not self._compile_reported:
            self._compile_reported = True
            rank_zero_info(
                f"ActivationMonitor: compiled the fused summary for {len(COMPILE_SECONDS)} tensor rank(s) in "
                f"{sum(COMPILE_SECONDS.values()):.1f} s (once per process; fused='eager' skips it)"
            )
        if not trainer.is_global_zero:
            return
        metrics = result.metrics()
        writers.log_scalars(trainer.loggers, metrics, step)
        self._remember(metrics, step)
        tb = writers.tensorboard_writers(trainer.loggers)
        if result.histograms:
            writers.log_histograms(tb, "act_hist", result.histograms, step)
        saturation = {n: f["saturation"] for n, f in zip(result.names, result.figures) if "saturation" in f}
        if saturation:
            self._history = [*self._history[-writers.HISTORY + 1 :], (step, saturation)]

    @rank_zero_only
    def _write_heatmap(self, trainer: pl.Trainer) -> None:
        tb = writers.tensorboard_writers(trainer.loggers)
        if not (self.heatmap and tb and self._history):
            return
        layers = list(dict.fromkeys(name for _, sat in self._history for name in sat))
        grid = np.array([[sat.get(name, np.nan) for _, sat in self._history] for name in layers])
        steps = [step for step, _ in self._history]
        kinds = {t.name: t.activation.kind.name for t in self._probe.targets if t.activation} if self._probe else {}
        image = saturation_heatmap(grid, steps, layers, [kinds.get(name) for name in layers])
        writers.log_image(tb, "act_saturation_heatmap", image, self._history[-1][0])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self._history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._history = [(int(step), dict(sat)) for step, sat in state_dict.get("history", [])]


class _FirstForward(HookSet):
    """Forward pre-hooks on the LightningModule and its top-level submodules: at the first call of each, trace it on
    the same input (``training_step`` may call ``self(x)`` or ``self.net(x)``)."""

    def __init__(self, monitor: ActivationMonitor, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().__init__()
        self.monitor, self.trainer, self.pl_module = monitor, trainer, pl_module
        self._seen: set[str] = set()
        self.parts = False  # top-level submodules were traced one by one

    def _register(self) -> Iterator[Any]:
        yield self.pl_module.register_forward_pre_hook(self._hook(""), with_kwargs=True)
        for name, child in self.pl_module.named_children():
            yield child.register_forward_pre_hook(self._hook(name), with_kwargs=True)

    def _hook(self, name: str) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if name in self._seen or (name and "" in self._seen):
                return  # traced already, or inside the traced model's forward
            self._seen.add(name)
            if name:
                self.parts = True
            self.monitor._traced(self.trainer, self.pl_module, name, args, kwargs)

        return hook
