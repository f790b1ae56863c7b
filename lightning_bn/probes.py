"""Hook lifecycle: attach to chosen modules for one step, collect rows on the device, detach.

A probe is attached only on steps that log; while attached, each hook reduces what it sees to a small row with
:mod:`lightning_bn.stats` and keeps no reference to the tensor. :meth:`ActivationProbe.collect` stacks the rows,
all-reduces them across processes (two collectives) and moves everything to the host in one transfer.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_bn import stats
from lightning_bn.activations import Activation, activation_of_module
from lightning_bn.tracing import HookSet as _HookSet
from lightning_bn.tracing import ModelMap

__all__ = ["ActivationProbe", "ForwardOrder", "ModuleFilter", "ProbeResult", "WatchTarget", "select_modules",
           "watch_targets"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "HookSet":
        import warnings

        warnings.warn(
            "`lightning_bn.probes.HookSet` moved to `lightning_bn.tracing.HookSet`; the old path goes away in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        return _HookSet
    raise AttributeError(f"module 'lightning_bn.probes' has no attribute {name!r}")


#: What a user may pass to choose modules: types, glob patterns on qualified names, or a ``(name, module)`` predicate.
ModuleFilter = Union[Sequence[str | type], Callable[[str, nn.Module], bool], None]


def default_module_filter(name: str, module: nn.Module) -> bool:
    """Every activation module (not the ``nn.Identity`` placeholder), and every leaf layer that owns a weight."""
    activation = activation_of_module(module)
    if activation is not None:
        return not activation.is_identity
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
class WatchTarget:
    """One thing a probe watches, and how.

    Attributes:
        name: the name its figures are logged under.
        module: the module hooked.
        activation: the activation whose saturation is judged (``None``: values only).
        hook: ``"layer"`` (the module's output, values only), ``"module"`` (an activation module: its input and
            output), ``"input"`` (the module's output feeds ``activation``: the activation is applied to it) or
            ``"output"`` (the module's output is ``activation``'s output).
        unit_dim: the dimension that indexes units (from the model map's layout); ``None``: read from the rank.
    """

    name: str
    module: nn.Module
    activation: Activation | None = None
    hook: str = "layer"
    unit_dim: int | None = None


@dataclass
class _Target:
    spec: WatchTarget
    row: Tensor | None = None
    alive: Tensor | None = None
    pending: Tensor | None = None
    hist: Tensor | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def activation(self) -> Activation | None:
        return self.spec.activation


def _as_target(target: WatchTarget | tuple[str, nn.Module]) -> WatchTarget:
    if isinstance(target, WatchTarget):
        return target
    name, module = target
    activation = activation_of_module(module)
    if activation is None or activation.is_identity:
        return WatchTarget(name, module)
    return WatchTarget(name, module, activation, "module")


def watch_targets(model: nn.Module, model_map: ModelMap | None, modules: ModuleFilter = None) -> list[WatchTarget]:
    """What a monitor watches: every activation site of ``model_map`` (module or functional) and every leaf layer
    with a weight, in module order; placeholders (``nn.Identity``, dropout, drop-path) never count as activations.

    Without a map, the activation modules of the registry. ``modules`` narrows the choice (see :data:`ModuleFilter`):
    patterns match a site's name or its module's name, types and predicates the module.

    Raises:
        ValueError: when a pattern or type in ``modules`` matches nothing; the message names it.

    Example::

        >>> import torch.nn.functional as F
        >>> from lightning_bn.tracing import trace_model
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.out(F.relu(self.fc(x)))
        >>> net = Net()
        >>> [(t.name, t.hook) for t in watch_targets(net, trace_model(net, torch.randn(2, 4)))]
        [('fc', 'layer'), ('fc.relu', 'input'), ('out', 'layer')]
    """
    if model_map is None:
        return [_as_target(t) for t in select_modules(model, modules)]
    validate_module_filter(modules)
    placeholders = set(model_map.placeholders)
    sites: dict[int, list[WatchTarget]] = {}
    for site in model_map.sites:
        target = WatchTarget(site.name, site.module, site.activation, site.hook, site.layout.unit_dim)
        sites.setdefault(id(site.module), []).append(target)
    candidates: list[tuple[str, nn.Module, WatchTarget]] = []
    for name, module in model.named_modules():
        if not name or name in placeholders:
            continue
        own = [t for t in sites.get(id(module), []) if t.hook == "module"]
        if own:
            candidates += [(name, module, t) for t in own]
        elif modules is not None or default_module_filter(name, module):
            candidates.append((name, module, _as_target((name, module))))
        candidates += [(t.name, module, t) for t in sites.get(id(module), []) if t.hook != "module"]
    if modules is None:
        chosen = [t for _, _, t in candidates]
    elif callable(modules) and not isinstance(modules, type):
        chosen = [t for n, m, t in candidates if modules(n, m)]
    else:
        entries = [modules] if isinstance(modules, (str, type)) else list(modules)

        def matches(entry: str | type, name: str, module: nn.Module) -> bool:
            if isinstance(entry, str):
                return fnmatch.fnmatchcase(name, entry)
            return isinstance(module, entry)

        for entry in entries:
            if not any(matches(entry, n, m) for n, m, _ in candidates):
                raise ValueError(
                    f"Expected `modules` entry {entry!r} to match a module of the model, but it matches none"
                )
        chosen = [t for n, m, t in candidates if any(matches(e, n, m) for e in entries)]
    return list({id(t): t for t in chosen}.values())


class ActivationProbe(_HookSet):
    """Summarize the outputs (and, for activations, the saturation) of chosen modules during one forward pass.

    Args:
        targets: :class:`WatchTarget` objects (e.g. from :func:`watch_targets`), or ``(name, module)`` pairs (e.g.
            from :func:`select_modules`), for which an activation module is judged by its registered kind.
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
        targets: Sequence[WatchTarget | tuple[str, nn.Module]],
        histogram_bins: int = 0,
        zero_tol: float = stats.DEFAULT_ZERO_TOL,
    ) -> None:
        super().__init__()
        self._targets = [_Target(_as_target(t)) for t in targets]
        self.histogram_bins = histogram_bins
        self.zero_tol = zero_tol
        self._paused = False
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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While inside, the attached hooks record nothing (a forward pass that is no training step)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _register(self) -> Iterator[RemovableHandle]:
        for target, (pre_hook, hook) in zip(self._targets, self._hooks):
            target.row = target.alive = target.pending = target.hist = None
            if pre_hook is not None:
                yield target.spec.module.register_forward_pre_hook(pre_hook)
            yield target.spec.module.register_forward_hook(hook)

    def _pre_hook(self, target: _Target) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self._paused or not args or not isinstance(args[0], Tensor):
                return
            self._record_saturation(target, stats.saturation(args[0], target.activation, target.spec.unit_dim))

        return hook

    @staticmethod
    def _record_saturation(target: _Target, found: tuple[Tensor, Tensor, Tensor]) -> None:
        saturated, units, alive = found
        target.pending = torch.stack([saturated, units, units.new_zeros(())])
        same = target.alive is not None and target.alive.shape == alive.shape
        target.alive = torch.maximum(target.alive, alive) if same else alive

    def _hook(self, target: _Target) -> Callable:
        spec = target.spec

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, (tuple, list)) and output:
                output = output[0]
            if self._paused or not isinstance(output, Tensor) or not output.is_floating_point():
                return
            if spec.hook == "input":  # the output feeds a functional activation: judge its input, sum its output
                x = output.detach()
                self._record_saturation(target, stats.saturation(x, spec.activation, spec.unit_dim))
                output = spec.activation(x)
            elif spec.activation is not None and (
                spec.hook == "output" or spec.activation.kind.output_derivative is not None
            ):
                found = stats.saturation(output, spec.activation, spec.unit_dim, from_output=True)
                self._record_saturation(target, found)
            values = stats.value_stats(output, self.zero_tol)
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


class ForwardOrder(_HookSet):
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
