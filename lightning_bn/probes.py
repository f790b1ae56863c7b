"""Hook lifecycle: attach to chosen modules for one step, collect rows on the device, detach.

A probe is attached only on steps that log; while attached, each hook reduces what it sees to a small row with
:mod:`lightning_bn.stats` and keeps no reference to the tensor. :meth:`ActivationProbe.collect` stacks the rows,
all-reduces them across processes (two collectives) and moves everything to the host in one transfer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_bn import stats
from lightning_bn.activations import Activation, activation_of_module

__all__ = ["ActivationProbe", "ForwardOrder", "ModuleFilter", "ProbeResult", "select_modules"]

#: What a user may pass to choose modules: types, glob patterns on qualified names, or a ``(name, module)`` predicate.
ModuleFilter = Union[Sequence[str | type], Callable[[str, nn.Module], bool], None]


def default_module_filter(name: str, module: nn.Module) -> bool:
    """Every activation module, and every leaf layer that owns a weight."""
    if activation_of_module(module) is not None:
        return True
    is_leaf = next(module.children(), None) is None
    return is_leaf and isinstance(getattr(module, "weight", None), Tensor)


def validate_module_filter(modules: ModuleFilter) -> None:
    """Check a ``modules`` argument without a model.

    Raises:
        ValueError: naming the entry that is neither a module type nor a string pattern.
    """
    if modules is None or callable(modules) and not isinstance(modules, type):
        return
    if isinstance(modules, (str, type)):
        modules = [modules]
    if not isinstance(modules, Iterable):
        raise ValueError(f"Expected `modules` to be types, glob patterns or a predicate but got {modules!r}")
    for entry in modules:
        if isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module)):
            continue
        raise ValueError(
            f"Expected each entry of `modules` to be an nn.Module subclass or a glob pattern but got {entry!r}"
        )


def select_modules(model: nn.Module, modules: ModuleFilter = None) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs of ``model`` chosen by ``modules`` (see :data:`ModuleFilter`).

    Raises:
        ValueError: when a pattern or type in ``modules`` matches no module; the message names it.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [name for name, _ in select_modules(net)]
        ['0', '1', '2']
        >>> [name for name, _ in select_modules(net, ["1", nn.Linear])]
        ['0', '1', '2']
    """
    validate_module_filter(modules)
    named = [(n, m) for n, m in model.named_modules() if n]
    if modules is None:
        return [(n, m) for n, m in named if default_module_filter(n, m)]
    if callable(modules) and not isinstance(modules, type):
        return [(n, m) for n, m in named if modules(n, m)]
    entries = [modules] if isinstance(modules, (str, type)) else list(modules)

    def matches(entry: str | type, name: str, module: nn.Module) -> bool:
        return fnmatch.fnmatchcase(name, entry) if isinstance(entry, str) else isinstance(module, entry)

    for entry in entries:
        if not any(matches(entry, n, m) for n, m in named):
            raise ValueError(f"Expected `modules` entry {entry!r} to match a module of the model, but it matches none")
    return [(n, m) for n, m in named if any(matches(e, n, m) for e in entries)]


class HookSet:
    """Hooks registered together and removed together: ``attach`` / ``detach``, or use it as a context manager.

    Subclasses say what to register in :meth:`_register`; the handles are kept here and nowhere else.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _register(self) -> Iterable[RemovableHandle]:
        raise NotImplementedError

    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = list(self._register())

    def detach(self) -> None:
        """Remove every hook this set registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _eager(fn: Callable) -> Callable:
    """Run ``fn`` eagerly when called from a ``torch.compile``'d forward (a graph break there, not a retrace)."""
    return torch.compiler.disable(fn)


@dataclass
class ProbeResult:
    """Host-side results of one probed step: figures per module and, optionally, histogram data."""

    names: list[str]
    figures: list[dict[str, float]]
    histograms: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Target:
    name: str
    module: nn.Module
    activation: Activation | None
    row: Tensor | None = None
    alive: Tensor | None = None
    pending: Tensor | None = None
    hist: Tensor | None = None


class ActivationProbe(HookSet):
    """Summarize the outputs (and, for activations, the saturation) of chosen modules during one forward pass.

    Args:
        targets: ``(name, module)`` pairs, e.g. from :func:`select_modules`.
        histogram_bins: bins per module histogram; 0 for none. Histograms are rank-local under DDP.
        zero_tol: ``|x|`` at or below this counts as near zero.

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
        targets: Sequence[tuple[str, nn.Module]],
        histogram_bins: int = 0,
        zero_tol: float = stats.DEFAULT_ZERO_TOL,
    ) -> None:
        super().__init__()
        self._targets = [_Target(name, module, activation_of_module(module)) for name, module in targets]
        self.histogram_bins = histogram_bins
        self.zero_tol = zero_tol
        # built once, so every attach registers the same callables; run eagerly inside torch.compile'd models
        self._hooks = [
            (
                _eager(self._pre_hook(t))
                if t.activation is not None and t.activation.kind.output_derivative is None
                else None,
                _eager(self._hook(t)),
            )
            for t in self._targets
        ]

    def _register(self) -> Iterator[RemovableHandle]:
        for target, (pre_hook, hook) in zip(self._targets, self._hooks):
            target.row = target.alive = target.pending = target.hist = None
            if pre_hook is not None:
                yield target.module.register_forward_pre_hook(pre_hook)
            yield target.module.register_forward_hook(hook)

    def _pre_hook(self, target: _Target) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            self._record_saturation(target, stats.saturation(args[0], target.activation))

        return hook

    @staticmethod
    def _record_saturation(target: _Target, found: tuple[Tensor, Tensor, Tensor]) -> None:
        saturated, units, alive = found
        target.pending = torch.stack([saturated, units, units.new_zeros(())])
        same = target.alive is not None and target.alive.shape == alive.shape
        target.alive = torch.maximum(target.alive, alive) if same else alive

    def _hook(self, target: _Target) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, (tuple, list)) and output:
                output = output[0]
            if not isinstance(output, Tensor) or not output.is_floating_point():
                return
            values = stats.value_stats(output, self.zero_tol)
            if target.activation is not None and target.activation.kind.output_derivative is not None:
                self._record_saturation(target, stats.saturation(output, target.activation, from_output=True))
            extra = target.pending if target.pending is not None else values.new_zeros(3)
            target.pending = None
            row = torch.cat([values, extra])
            if self.histogram_bins and target.row is None:
                target.hist = stats.histogram(output, values[3], values[4], self.histogram_bins)
            target.row = row if target.row is None else stats.combine(target.row, row)

        return hook

    def collect(self, distributed: bool = True) -> ProbeResult:
        """Stack the rows, all-reduce them (when ``distributed`` and a process group exists), transfer once.

        Modules that did not run this step report an empty row (count 0). Resets the accumulators.
        """
        device = next((t.row.device for t in self._targets if t.row is not None), torch.device("cpu"))
        empty = stats.empty_row(device)
        rows = (
            torch.stack([t.row if t.row is not None else empty for t in self._targets])
            if self._targets
            else (empty.new_zeros(0, len(stats.FIELDS)))
        )
        alive_parts = [t.alive if t.alive is not None else rows.new_zeros(0) for t in self._targets]
        sizes = [part.numel() for part in alive_parts]
        alive = torch.cat(alive_parts) if alive_parts else rows.new_zeros(0)
        if distributed:
            rows, alive = stats.reduce_across_processes(rows, alive)
        dead_column = stats.FIELDS.index("dead_units")
        units_column = stats.FIELDS.index("units")
        alive_counts = torch.stack([part.sum() for part in alive.split(sizes)]) if sizes else rows.new_zeros(0)
        rows[:, dead_column] = torch.where(rows[:, units_column] > 0, rows[:, units_column] - alive_counts, 0.0)
        bins = self.histogram_bins
        hists = [t.hist if t.hist is not None else rows.new_zeros(bins) for t in self._targets] if bins else []
        payload = torch.cat([rows.reshape(-1), *hists]).cpu().tolist()
        width = len(stats.FIELDS)
        host_rows = [payload[i * width : (i + 1) * width] for i in range(len(self._targets))]
        offset = len(self._targets) * width
        result = ProbeResult([t.name for t in self._targets], [stats.figures(r) for r in host_rows])
        if bins:
            for i, (target, row) in enumerate(zip(self._targets, host_rows)):
                counts = payload[offset + i * bins : offset + (i + 1) * bins]
                if row[0] == 0 or target.hist is None:
                    continue
                low, high = row[3], row[4]
                limits = [low + (high - low) * (k + 1) / bins for k in range(bins)]
                result.histograms.append(
                    {
                        "name": target.name,
                        "min": low,
                        "max": high,
                        "num": sum(counts),
                        "sum": row[1],
                        "sum_squares": row[2],
                        "bucket_limits": limits,
                        "bucket_counts": counts,
                    }
                )
        for target in self._targets:
            target.row = target.alive = target.pending = target.hist = None
        return result


class ForwardOrder(HookSet):
    """Record the order in which modules first run during a forward pass (to name the *first* bad layer).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with ForwardOrder(net) as order:
        ...     _ = net(torch.randn(1, 2))
        >>> order.names
        ['0', '1']
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: list[str] = []
        self._seen: set[str] = set()

    def _register(self) -> Iterator[RemovableHandle]:
        self.names = []
        self._seen = set()
        for name, module in self.model.named_modules():
            if name and next(module.children(), None) is None:
                yield module.register_forward_pre_hook(self._record(name))

    def _record(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self._seen:
                self._seen.add(name)
                self.names.append(name)

        return hook
