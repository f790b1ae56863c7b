"""The activation probe: attach to chosen modules for one step, collect rows on the device, detach.

A probe is attached only on steps that log; while attached, each hook reduces what it sees to a small row with
:mod:`lightning_bn.monitoring.rows` and keeps no reference to the tensor. :meth:`ActivationProbe.gather` stacks the
rows and all-reduces them across processes (two collectives); the engine moves everything to the host in one transfer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_bn.activations import Activation, activation_of_module
from lightning_bn.monitoring.rows import (
    DEFAULT_ZERO_TOL,
    FIELDS,
    TRANSMISSION,
    Backend,
    backend,
    combine,
    empty_row,
    figures,
    fused_row,
    histogram,
    histogram_record,
    reduce_across_processes,
    saturation,
    transmission_sum,
    unit_dim_of,
)
from lightning_bn.monitoring.select import WatchTarget, _as_target, select_modules  # noqa: F401  (doctest)
from lightning_bn.tags import ACTIVATION_STATISTICS
from lightning_bn.tracing import HookSet

__all__ = ["ActivationProbe", "ProbeResult", "layer_entry"]

_SATURATED, _UNITS, _NONFINITE = (FIELDS.index(name) for name in ("saturated", "units", "nonfinite"))


def layer_entry(target: WatchTarget) -> dict[str, Any]:
    """What the report needs to know of a watched layer: name, module type, activation, how it is watched and, for
    an activation, the fraction its kind saturates at a healthy N(0, 1) input.

    Example::

        >>> layer_entry(WatchTarget("fc1", nn.Linear(2, 2)))
        {'name': 'fc1', 'module_type': 'Linear', 'activation': None, 'hook': 'layer'}
    """
    activation = target.activation.describe() if target.activation is not None else None
    entry = {"name": target.name, "module_type": type(target.module).__name__, "activation": activation,
             "hook": target.hook}  # fmt: skip
    if target.activation is not None:  # the report's baseline for this kind (lightning_bn.report.Thresholds)
        entry["healthy_saturation"] = round(target.activation.healthy_saturation, 6)
    return entry


def _eager(fn: Callable) -> Callable:
    """Run ``fn`` eagerly when called from a ``torch.compile``'d forward (a graph break there, not a retrace), and
    outside the attention probe's torch-function mode (its own reductions are no attention calls: each torch call
    through the mode's Python dispatch costs ~10 us, hundreds a layer)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with outside_capture():
            return fn(*args, **kwargs)

    return torch.compiler.disable(run)


@contextlib.contextmanager
def outside_capture() -> Iterator[None]:
    """Leave the attention probe's mode (when it is the innermost torch-function mode) for the block."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if stack and getattr(stack[-1], "lightning_bn_capture", False):
        with _pop_mode_temporarily():
            yield
    else:
        yield


@dataclass
class ProbeResult:
    """Host-side results of one probed step: figures per module and, optionally, histogram data."""

    names: list[str]
    figures: list[dict[str, float]]
    histograms: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The figures as logged: ``{"act_std/<layer>": value, ...}``."""
        return {
            f"{ACTIVATION_STATISTICS[key]}/{name}": value
            for name, figs in zip(self.names, self.figures)
            for key, value in figs.items()
        }


@dataclass
class _Target:
    spec: WatchTarget
    row: Tensor | None = None
    alive: dict[tuple[int, ...], Tensor] | None = None  # per call shape: per-unit "any sample unsaturated"
    units: dict[tuple[int, ...], Tensor] | None = None
    pending: Tensor | None = None
    bounds: tuple[Any, tuple[Tensor, Tensor]] | None = None
    hist: Tensor | None = None
    per_unit: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] | None = None  # learned per-unit bounds (PReLU)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def activation(self) -> Activation | None:
        return self.spec.activation


def _measuring() -> bool:
    """Whether the forward pass running now is one a monitor measures: a training forward (gradients on), not the
    recomputation of a checkpointed segment during backward, not an evaluation or a trace under ``no_grad``."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


class ActivationProbe(HookSet):
    """Summarize the outputs (and, for activations, the saturation) of chosen modules during training forward passes.

    While attached, each hook reduces what it sees to one row on the device and keeps no reference to the tensor;
    with ``training_only``, forward passes that are no training step (``no_grad`` evaluation, a trace, the
    recomputation of a checkpointed segment in backward) are not counted. Several calls (micro-batches) combine
    exactly.

    Args:
        targets: :class:`WatchTarget` objects (e.g. from :func:`watch_targets`), or ``(name, module)`` pairs (e.g.
            from :func:`select_modules`), for which an activation module is judged by its registered kind.
        histogram_bins: bins per module histogram; 0 for none. Histograms are rank-local under DDP.
        zero_tol: ``|x|`` at or below this counts as near zero.
        fused: ``"auto"``, ``"compiled"`` or ``"eager"``: how the one fused pass per tensor runs
            (:mod:`lightning_bn.monitoring.rows`).
        training_only: count only training forward passes (gradients on; not the recomputation of a checkpointed
            segment during backward), as the monitors do; ``False``: every pass while attached.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        >>> probe = ActivationProbe(select_modules(net))
        >>> with probe:
        ...     _ = net(torch.randn(16, 4))
        >>> result = probe.collect()
        >>> result.names, 0.0 <= result.figures[1]["saturation"] <= 1.0
        (['0', '1'], True)
    """

    def __init__(
        self,
        targets: Sequence[WatchTarget | tuple[str, nn.Module]],
        histogram_bins: int = 0,
        zero_tol: float = DEFAULT_ZERO_TOL,
        fused: Backend = "auto",
        training_only: bool = False,
    ) -> None:
        super().__init__()
        self.training_only = training_only
        self._path = backend(fused)
        self._min, self._max = FIELDS.index("min"), FIELDS.index("max")
        self._targets = [_Target(_as_target(t)) for t in targets]
        #: calls so far of each module watched call by call (``WatchTarget.calls`` > 1), and the hook that counts them
        self._calls: dict[int, int] = {}
        self._counters = {id(t.spec.module): _eager(self._counter(t.spec.module)) for t in self._targets
                          if t.spec.calls > 1}  # fmt: skip
        self._extra: dict[str, _Target] = {}  # measured by :meth:`record` (a live trace), not hooked
        self.histogram_bins = histogram_bins
        self.zero_tol = zero_tol
        #: a context entered around each hook's work (a live trace keeps the probe's own operations out of it)
        self.quiet: Callable[[], contextlib.AbstractContextManager] | None = None
        # built once, so every attach registers the same callables; run eagerly inside torch.compile'd models
        self._hooks = [
            (
                _eager(self._pre_hook(t))
                if t.spec.hook == "module" and t.activation.kind.output_derivative is None
                else None,
                _eager(self._hook(t)),
            )
            for t in self._targets
        ]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._targets]

    @property
    def targets(self) -> list[WatchTarget]:
        """The watched targets, in order."""
        return [t.spec for t in self._targets]

    @staticmethod
    def _learned(target: _Target) -> bool:
        """Whether the target is a module whose kind learns a parameter per unit (PReLU's slopes)."""
        act = target.spec.activation
        return act is not None and act.kind.unit_asymptotes is not None and target.spec.hook == "module"

    @staticmethod
    def _refresh(target: _Target) -> None:
        """The module's parameters as they are in the forward pass being measured (read at its first call in a
        logging step, not at the trace): the activation's parameters (PReLU's mean slope: one host read) and,
        lazily, its per-unit bounds."""
        spec = target.spec
        fresh = activation_of_module(spec.module)
        if fresh is not None and fresh.kind is spec.activation.kind:
            spec.activation = fresh
        target.bounds, target.per_unit = None, {}

    @staticmethod
    def _unit_bounds(target: _Target, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The per-unit asymptote bounds of the watched module, shaped to broadcast against ``x``."""
        key = (x.ndim, x.device)
        if key not in target.per_unit:
            found = target.activation.unit_asymptotes(target.spec.module, x.ndim)
            if found is None:
                return None
            target.per_unit[key] = tuple(b.to(x.device) for b in found)
        return target.per_unit[key]

    def _register(self) -> Iterator[RemovableHandle]:
        self._calls = {}
        counted: set[int] = set()
        for target, (pre_hook, hook) in zip(self._targets, self._hooks):
            target.per_unit = None  # parameters learned per unit are read again at the step's first call
            target.row = target.alive = target.units = target.pending = target.hist = None
            key = id(target.spec.module)
            if key in self._counters and key not in counted:  # first: the call is counted before it is measured
                counted.add(key)
                yield target.spec.module.register_forward_pre_hook(self._counters[key])
            if pre_hook is not None:
                yield target.spec.module.register_forward_pre_hook(pre_hook)
            yield target.spec.module.register_forward_hook(hook)

    def _counter(self, module: nn.Module) -> Callable:
        key = id(module)

        def hook(module: nn.Module, args: tuple) -> None:
            if not (self.training_only and not _measuring()):
                self._calls[key] = self._calls.get(key, 0) + 1

        return hook

    def _this_call(self, spec: WatchTarget) -> bool:
        """Whether the module's call running now is the one ``spec`` watches (always, for a module watched whole)."""
        return spec.calls == 1 or (self._calls.get(id(spec.module), 0) - 1) % spec.calls == spec.call

    def _pre_hook(self, target: _Target) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor) or (self.training_only and not _measuring()):
                return
            if not self._this_call(target.spec):
                return
            with self.quiet() if self.quiet is not None else contextlib.nullcontext():
                found = saturation(args[0], target.activation, target.spec.unit_dim)
                self._record_saturation(target, found, tuple(args[0].shape))
                x = args[0]
                unsaturated = x.numel() - found[0]  # (inf/NaN count as unsaturated: only for indicator kinds' bound)
                transmission = transmission_sum(x, target.activation, x, unsaturated)
                target.pending = torch.cat([target.pending, transmission.reshape(1)])

        return hook

    @staticmethod
    def _record_saturation(target: _Target, found: tuple[Tensor, Tensor, Tensor], shape: tuple[int, ...]) -> None:
        """Per call shape (all dims but the batch): one module used at two places keeps two sets of units."""
        saturated, units, alive = found
        target.pending = torch.stack([saturated, units, units.new_zeros(())])  # transmission follows (pre-hook)
        if target.alive is None:
            target.alive, target.units = {}, {}
        key = shape[1:]
        seen = target.alive.get(key)
        target.alive[key] = alive if seen is None or seen.shape != alive.shape else torch.maximum(seen, alive)
        target.units[key] = units

    def _bounds(self, target: _Target, device: torch.device, from_output: bool) -> tuple[Tensor, Tensor]:
        """The activation's asymptote bounds as 0-d tensors on ``device``: made once, no copy per step."""
        key = (device, from_output)
        if target.bounds is None or target.bounds[0] != key:
            act = target.activation
            low, high = act.output_asymptotes() if from_output else act.asymptotes
            target.bounds = (key, (torch.tensor(low, device=device), torch.tensor(high, device=device)))
        return target.bounds[1]

    def _hook(self, target: _Target) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, (tuple, list)) and output:
                output = output[0]
            if not isinstance(output, Tensor) or not output.is_floating_point():
                return
            if self.training_only and not _measuring():
                return
            if not self._this_call(target.spec):
                return
            with self.quiet() if self.quiet is not None else contextlib.nullcontext():
                self._measure(target, output)

        return hook

    def _measure(self, target: _Target, output: Tensor) -> None:
        """Fold one call's output into the target's row (and saturation, alive units, histogram)."""
        spec = target.spec
        if target.per_unit is None and self._learned(target):
            self._refresh(target)
        judged = None
        if spec.hook == "input":  # the output feeds a functional activation: judge its input, sum its output
            x = output.detach()
            output = spec.activation(x)
            judged = (x, self._bounds(target, x.device, from_output=False))
        elif spec.activation is not None and (
            spec.hook == "output" or spec.activation.kind.output_derivative is not None
        ):
            judged = (output, self._bounds(target, output.device, from_output=True))
        if judged is not None:
            x, bounds = judged
            if target.per_unit is not None:  # PReLU: judged per channel from its slopes now
                bounds = self._unit_bounds(target, x) or bounds
            unit_dim = unit_dim_of(x) if spec.unit_dim is None else spec.unit_dim
            row, alive = fused_row(output, self.zero_tol, x=x, bounds=bounds, unit_dim=unit_dim, path=self._path)
            act = spec.activation
            if not act.slope_is_indicator:
                row[TRANSMISSION] = transmission_sum(output, act, x)
            elif row.device.type == "cpu":  # f'^2 is 1 exactly where unsaturated: the row has the count already
                count, nonfinite, saturated = row[[0, _NONFINITE, _SATURATED]].tolist()
                row[TRANSMISSION] = (count - nonfinite - saturated) / act.gradient_power
            else:
                row[TRANSMISSION] = transmission_sum(output, act, x, row[0] - row[_NONFINITE] - row[_SATURATED])
            if alive.numel():
                self._record_saturation(target, (row[_SATURATED], row[_UNITS], alive), tuple(x.shape))
        else:
            row, _ = fused_row(output, self.zero_tol, path=self._path)
            if target.pending is not None:  # judged on the input by the pre-hook
                row = torch.cat([row[:_SATURATED], target.pending])
        target.pending = None
        if self.histogram_bins and target.row is None:
            target.hist = histogram(output, row[self._min], row[self._max], self.histogram_bins)
        target.row = row if target.row is None else combine(target.row, row)

    def record(self, spec: WatchTarget, output: Tensor) -> None:
        """Measure ``output`` as ``spec``'s hook would (for a site a live trace found in the middle of the forward
        pass it is tracing); :meth:`adopt` hands the row to the probe that watches it from then on."""
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return
        if self.training_only and not _measuring():
            return
        target = self._extra.setdefault(spec.name, _Target(spec))
        self._measure(target, output)

    def adopt(self, *others: ActivationProbe) -> None:
        r"""Take over what ``others`` measured so far (their hooked targets and :meth:`record`\ ed sites), by name:
        the first logging step of a model traced on its first call, measured before this probe existed."""
        found = {t.name: t for o in others for t in [*o._targets, *o._extra.values()] if t.row is not None}
        for target in self._targets:
            seen = found.get(target.name)
            if target.spec.calls > 1:  # what the others saw of this module pooled its calls: not one call's row
                continue
            if seen is not None and target.row is None:
                target.row, target.alive, target.units, target.hist = seen.row, seen.alive, seen.units, seen.hist

    def gather(self, distributed: bool = True) -> tuple[Tensor, Callable[[list[float]], ProbeResult]]:
        """The step's rows on the device, all-reduced across processes (when ``distributed`` and a process group
        exists: two collectives), flattened with the histograms, and the function that turns their host copy into a
        :class:`ProbeResult`. Modules that did not run are left out of the result (an empty row would read mean NaN,
        min +inf: a T5 ``shared`` embedding whose calls go through a tied copy). Resets the accumulators."""
        device = next((t.row.device for t in self._targets if t.row is not None), torch.device("cpu"))
        empty = empty_row(device)
        width = len(FIELDS)
        rows = (
            torch.stack([t.row if t.row is not None else empty for t in self._targets])
            if self._targets
            else empty.new_zeros(0, width)
        )
        units_column = FIELDS.index("units")
        for i, target in enumerate(self._targets):
            if target.units:  # every call shape's units together (device scalars: no host round trip)
                rows[i, units_column] = torch.stack(list(target.units.values())).sum()
        alive_parts = [torch.cat(list(t.alive.values())) if t.alive else rows.new_zeros(0) for t in self._targets]
        sizes = [part.numel() for part in alive_parts]
        alive = torch.cat(alive_parts) if alive_parts else rows.new_zeros(0)
        if distributed:
            rows, alive = reduce_across_processes(rows, alive)
        dead_column = FIELDS.index("dead_units")
        alive_counts = torch.stack([part.sum() for part in alive.split(sizes)]) if sizes else rows.new_zeros(0)
        rows[:, dead_column] = torch.where(rows[:, units_column] > 0, rows[:, units_column] - alive_counts, 0.0)
        bins = self.histogram_bins
        hists = [t.hist if t.hist is not None else rows.new_zeros(bins) for t in self._targets] if bins else []
        has_hist = [t.hist is not None for t in self._targets]
        names = self.names
        for target in [*self._targets, *self._extra.values()]:
            target.row = target.alive = target.units = target.pending = target.hist = None
        self._extra = {}

        def parse(payload: list[float]) -> ProbeResult:
            host_rows = [payload[i * width : (i + 1) * width] for i in range(len(names))]
            offset = len(names) * width
            ran = [i for i, row in enumerate(host_rows) if row[0] > 0]  # a module that did not run has no figures
            result = ProbeResult([names[i] for i in ran], [figures(host_rows[i]) for i in ran])
            for i, (name, row) in enumerate(zip(names, host_rows)):
                counts = payload[offset + i * bins : offset + (i + 1) * bins]
                if bins and row[0] and has_hist[i]:
                    low, high = row[self._min], row[self._max]
                    n, mean, m2 = row[0], row[1], row[2]  # TensorBoard wants the plain sum and sum of squares
                    result.histograms.append(histogram_record(name, low, high, counts, sum(counts), n * mean,
                                                              m2 + n * mean * mean))  # fmt: skip
            return result

        return torch.cat([rows.reshape(-1), *hists]), parse

    def collect(self, distributed: bool = True) -> ProbeResult:
        """:meth:`gather`, then one device-to-host transfer."""
        payload, parse = self.gather(distributed)
        return parse(payload.cpu().tolist())
