"""Choosing what a probe watches: module filters, the targets of a model map, the names a figure is logged under
(wrapper prefixes stripped) and the forward order of modules."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_bn.activations import Activation, activation_of_module
from lightning_bn.layers import get_layer_kind
from lightning_bn.tracing import HookSet, ModelMap

__all__ = ["ForwardOrder", "ModuleFilter", "WatchTarget", "default_module_filter", "plain_names", "scripted_modules",
           "select_modules", "unwrap", "validate_module_filter", "watch_targets"]  # fmt: skip

#: What a user may pass to choose modules: types, glob patterns on qualified names, or a ``(name, module)`` predicate.
ModuleFilter = Union[Sequence[str | type], Callable[[str, nn.Module], bool], None]


def default_module_filter(name: str, module: nn.Module) -> bool:
    """Every activation module (not the ``nn.Identity`` placeholder), every leaf layer that owns a weight, every
    layer of the registry (:func:`lightning_bn.layers.get_layer_kind`: ``LSTM``/``GRU``/``RNN``,
    ``nn.MultiheadAttention``, whose weights have other names) and the recurrent cells (``LSTMCell``, ``GRUCell``,
    ``RNNCell``); never a ``torch.jit`` scripted module (no hook can go on it).

    Example::

        >>> [default_module_filter("m", m) for m in (nn.LSTM(2, 2), nn.GRUCell(2, 2), nn.MultiheadAttention(4, 2))]
        [True, True, True]
    """
    if _is_scripted(module):
        return False
    activation = activation_of_module(module)
    if activation is not None:
        return not activation.is_identity
    if get_layer_kind(module) is not None or isinstance(module, nn.RNNCellBase):
        return True
    is_leaf = next(module.children(), None) is None
    return is_leaf and isinstance(getattr(module, "weight", None), Tensor)


def _is_scripted(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def scripted_modules(model: nn.Module) -> list[str]:
    """Qualified names of the outermost ``torch.jit`` scripted submodules of ``model``: no hook can go on them or
    inside them, so the monitors watch them from nothing and name them once.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
        >>> scripted_modules(net)
        ['1']
    """
    found: list[str] = []
    for name, module in model.named_modules():
        if name and _is_scripted(module) and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return found


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


def _matches(entry: str | type, name: str, module: nn.Module) -> bool:
    """A ``modules`` entry against one module: a glob pattern on its name, or a type."""
    return fnmatch.fnmatchcase(name, entry) if isinstance(entry, str) else isinstance(module, entry)


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
    named = [(n, m) for n, m in model.named_modules() if n and not _is_scripted(m)]
    if modules is None:
        return [(n, m) for n, m in named if default_module_filter(n, m)]
    if callable(modules) and not isinstance(modules, type):
        return [(n, m) for n, m in named if modules(n, m)]
    entries = [modules] if isinstance(modules, (str, type)) else list(modules)
    for entry in entries:
        if not any(_matches(entry, n, m) for n, m in named):
            raise ValueError(f"Expected `modules` entry {entry!r} to match a module of the model, but it matches none")
    return [(n, m) for n, m in named if any(_matches(e, n, m) for e in entries)]


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
        call: which call of the module in each forward pass this target is (0-based), when ``calls`` > 1.
        calls: how many times the module runs per forward pass, when each call is its own row (an activation module
            reused: a ResNet Bottleneck's ``relu`` is ``relu``, ``relu@2`` and ``relu@3``, the last after the add).
    """

    name: str
    module: nn.Module
    activation: Activation | None = None
    hook: str = "layer"
    unit_dim: int | None = None
    call: int = 0
    calls: int = 1


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
    with a weight, in forward order; placeholders (``nn.Identity``, dropout, drop-path) never count as activations.

    Without a map, the activation modules of the registry. ``modules`` narrows the choice (see :data:`ModuleFilter`):
    patterns match a site's name or its module's name, types and predicates the module.

    Raises:
        ValueError: when a pattern or type in ``modules`` matches nothing; the message names it.

    Example::

        >>> import torch
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
        calls = site.calls if site.hook == "module" else 1  # each call of a reused activation module: its own row
        for call in range(calls):
            name = site.name if call == 0 else f"{site.name}@{call + 1}"
            target = WatchTarget(name, site.module, site.activation, site.hook, site.layout.unit_dim, call, calls)
            sites.setdefault(id(site.module), []).append(target)
    candidates: list[tuple[str, nn.Module, WatchTarget]] = []
    for name, module in model.named_modules():
        if not name or name in placeholders or _is_scripted(module):
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
        for entry in entries:
            if not any(_matches(entry, n, m) for n, m, _ in candidates):
                raise ValueError(
                    f"Expected `modules` entry {entry!r} to match a module of the model, but it matches none"
                )
        chosen = [t for n, m, t in candidates if any(_matches(e, n, m) for e in entries)]
    unique = list({id(t): t for t in chosen}.values())
    rank = {name: i for i, name in enumerate(model_map.order)}
    names = {id(m): n for n, m in model.named_modules()}
    return sorted(unique, key=lambda t: rank.get(names.get(id(t.module), ""), len(rank)))  # forward order


class ForwardOrder(HookSet):
    """Record the order in which modules first run during a forward pass (to name the *first* bad layer).

    Example::

        >>> import torch
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
            if name and next(module.children(), None) is None and not _is_scripted(module):
                yield module.register_forward_pre_hook(self._record(name))

    def _record(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self._seen:
                self._seen.add(name)
                self.names.append(name)

        return hook


#: class name of a wrapper module -> the attribute holding the model it wraps (torch.compile, Fabric, DDP, DP, FSDP1)
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",
    "_FabricModule": "_forward_module",
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / Fabric / DDP wrappers (the module whose names a user knows).

    Example::

        >>> net = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(net)) is net
        True
    """
    while isinstance(getattr(model, _WRAPPERS.get(type(model).__name__, ""), None), nn.Module):
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model


def plain_names(model: nn.Module) -> Callable[[str], str]:
    """A function from a qualified name inside ``model`` (a module, a parameter, an activation site
    ``<layer>.<kind>``) to the same name without wrapper segments (``_orig_mod.`` of torch.compile,
    ``_forward_module.`` of Fabric, ``module.`` of DDP), so figures of a wrapped model carry the plain model's tags.

    Example::

        >>> class Task(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.DataParallel(nn.Sequential(nn.Linear(2, 2)))
        >>> plain = plain_names(Task())
        >>> plain("net.module.0"), plain("net.module.0.weight"), plain("net.module.0.relu#2")
        ('net.0', 'net.0.weight', 'net.0.relu#2')
    """
    modules = dict(model.named_modules())
    clean: dict[str, str] = {"": ""}
    for name in modules:
        if not name:
            continue
        parent, _, attr = name.rpartition(".")
        outer = modules.get(parent)
        head = clean.get(parent, parent)
        wrapped = outer is not None and _WRAPPERS.get(type(outer).__name__) == attr
        clean[name] = head if wrapped else (f"{head}.{attr}" if head else attr)

    def plain(name: str) -> str:
        if name in clean:
            return clean[name]
        head, _, tail = name.rpartition(".")
        if not head:
            return name
        base = plain(head)
        return f"{base}.{tail}" if base else tail

    return plain
