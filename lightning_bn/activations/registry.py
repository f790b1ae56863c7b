"""The activation registry: activation kind -> implementations, local derivative, saturation, init.

The built-in kinds are registered by :mod:`lightning_bn.activations.builtins`.

Every other module asks this registry what an activation is; nothing else hard-codes activation names.
A *kind* (``"relu"``, ``"tanh"``, ...) lists the module classes and functional callables that implement it,
its local derivative, and the initializer it wants. A resolved :class:`Activation` is a kind plus its
parameters (leaky slope, ELU alpha, GELU approximation, ...), found from a module or a functional call.

Saturation is defined once, here: an element is saturated when it sits on an *asymptote* of the activation — in
the region, reaching to -inf or +inf, where the local derivative stays below 1% of the activation's maximum
derivative (Glorot & Bengio 2010 looked at sigmoid/tanh pinned at an asymptote; the same rule marks ReLU at or below
zero and GELU/SiLU far on the negative side). The narrow band where GELU, SiLU, Mish or hardswish have f' = 0 at their
minimum is no asymptote, so it is not saturation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Activation",
    "ActivationKind",
    "SATURATION_THRESHOLD",
    "activation_of_call",
    "activation_of_module",
    "available_activations",
    "get_activation",
    "register_activation",
    "registered_kinds",
]

InitScheme = Literal["xavier", "kaiming", "lecun", "numeric"]

#: An element is saturated where ``|f'(x)| < SATURATION_THRESHOLD * max |f'|``.
SATURATION_THRESHOLD = 0.01

_QUADRATURE_POINTS = 201
_GRID = torch.linspace(-30.0, 30.0, 60001, dtype=torch.float64)


def _normalize(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


@dataclass(frozen=True)
class ActivationKind:
    """One kind of activation function.

    Args:
        name: canonical name, e.g. ``"leaky_relu"``.
        forward: the function ``f(x, **params)``.
        derivative: ``f'(x, **params)`` elementwise; ``None`` means autograd on ``forward``.
        modules: module classes that implement the kind.
        functions: functional callables that implement it (``F.relu``, ``torch.relu``, ``Tensor.relu``, ...).
        init: recommended initializer: ``"xavier"``, ``"kaiming"``, ``"lecun"`` or ``"numeric"`` (gain from
            quadrature, finished by a data-driven pass since no fixed gain is stable at depth).
        defaults: default parameters (e.g. ``{"negative_slope": 0.01}``).
        module_params: how to read the parameters from a module: ``{param: attribute name}``.
        call_params: how to read them from a functional call: ``{param: (position, keyword)}``.
        homogeneous: positively homogeneous (``f(ax) = a f(x)`` for ``a > 0``): a fixed gain is exact at any depth.
        output_derivative: ``f'`` written as a function of the output ``y = f(x)``, where that is possible (monotone
            kinds); lets monitors judge saturation from the output alone, which is cheaper.
        param_values: turns the raw values read by ``module_params`` / ``call_params`` into the plain, hashable
            parameters of an :class:`Activation` (PReLU: its learned slope tensor -> the mean slope).
        unit_asymptotes: for kinds with a learned parameter per unit (PReLU: one slope per channel), the asymptote
            bounds ``(low, high)`` of every unit from a module's *current* parameters, shaped to broadcast against an
            input of the given rank (``-inf`` / ``inf`` where a unit has no flat side). Monitors read them on each
            logging step, since the parameters change during training; they hold on the output too (``f(0) = 0``).

    Example::

        >>> import torch
        >>> kind = get_activation("relu").kind
        >>> kind.name, kind.init
        ('relu', 'kaiming')
    """

    name: str
    forward: Callable[..., Tensor]
    derivative: Callable[..., Tensor] | None = None
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    init: InitScheme = "numeric"
    defaults: dict[str, Any] = field(default_factory=dict)
    module_params: dict[str, str] = field(default_factory=dict)
    call_params: dict[str, tuple[int, str]] = field(default_factory=dict)
    homogeneous: bool = False
    output_derivative: Callable[..., Tensor] | None = None
    param_values: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    unit_asymptotes: Callable[[nn.Module, int], tuple[Tensor, Tensor]] | None = None


@dataclass(frozen=True)
class Activation:
    """An activation kind with its parameters: what saturation, gain and init are computed from.

    Example::

        >>> import torch
        >>> act = get_activation("tanh")
        >>> act.saturated(torch.tensor([0.0, 5.0])).tolist()
        [False, True]
        >>> round(get_activation("relu").gain, 6)
        1.414214
    """

    kind: ActivationKind
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def __call__(self, x: Tensor) -> Tensor:
        return self.kind.forward(x, **self.kwargs)

    def derivative(self, x: Tensor) -> Tensor:
        """Local derivative ``f'(x)``, elementwise, on ``x``'s device."""
        if self.kind.derivative is not None:
            return self.kind.derivative(x, **self.kwargs)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(leaf).sum(), leaf)
        return grad

    def derivative_from_output(self, y: Tensor) -> Tensor:
        """``f'(x)`` computed from ``y = f(x)``; only for kinds with an ``output_derivative``."""
        if self.kind.output_derivative is None:
            raise ValueError(f"Expected a kind with an output derivative but got {self.kind.name!r}")
        return self.kind.output_derivative(y, **self.kwargs)

    @property
    def saturation_threshold(self) -> float:
        """``|f'|`` below this is saturated: 1% of the maximum derivative."""
        return SATURATION_THRESHOLD * self.max_derivative

    @property
    def max_derivative(self) -> float:
        """``max |f'(x)|`` found on a dense grid over [-30, 30] (computed once per kind and parameters)."""
        return _numeric_constants(self)[0]

    @property
    def asymptotes(self) -> tuple[float, float]:
        """``(low, high)``: inputs ``x <= low`` or ``x >= high`` are saturated (``|f'| < 1% · max |f'|`` from there on
        to -inf / +inf); ``-inf`` / ``inf`` where the activation has no flat asymptote on that side.

        Example::

            >>> get_activation("relu").asymptotes, [round(v, 2) for v in get_activation("tanh").asymptotes]
            ((0.0, inf), [-2.99, 2.99])
        """
        return _numeric_constants(self)[2]

    def output_asymptotes(self) -> tuple[float, float]:
        """The same bounds on the output ``y = f(x)`` (monotone kinds only: those with an ``output_derivative``)."""
        if self.kind.output_derivative is None:
            raise ValueError(f"Expected a monotone kind (with an output derivative) but got {self.kind.name!r}")
        low, high = self.asymptotes
        ends = self(torch.tensor([low, high], dtype=torch.float64).clamp(-1e30, 1e30)).tolist()
        return (ends[0] if math.isfinite(low) else -math.inf, ends[1] if math.isfinite(high) else math.inf)

    def unit_asymptotes(self, module: nn.Module, ndim: int) -> tuple[Tensor, Tensor] | None:
        """Per-unit asymptote bounds from ``module``'s current parameters, shaped for an input of rank ``ndim``
        (kinds with learned per-unit parameters, e.g. PReLU); ``None`` for every other kind.

        Example::

            >>> prelu = nn.PReLU(3)
            >>> with torch.no_grad():
            ...     prelu.weight[0] = 0.0
            >>> low, high = get_activation(prelu).unit_asymptotes(prelu, 2)
            >>> low.tolist(), high.tolist()
            ([[0.0, -inf, -inf]], [[inf, inf, inf]])
        """
        if self.kind.unit_asymptotes is None:
            return None
        return self.kind.unit_asymptotes(module, ndim)

    def saturated(self, x: Tensor) -> Tensor:
        """Boolean mask of inputs on an asymptote (see :attr:`asymptotes`); False for NaN."""
        low, high = self.asymptotes
        return (x <= low) | (x >= high)

    @property
    def is_identity(self) -> bool:
        return self.kind.name == "identity"

    @property
    def healthy_saturation(self) -> float:
        """Fraction of inputs saturated at a healthy unit-variance input, ``z ~ N(0, 1)`` (0.5 for ReLU, ~0 for
        sigmoid, tanh and GELU); computed once per kind and parameters."""
        key = (id(self.kind), self.params, "saturation")
        if key not in _SATURATION:
            x = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
            density = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * (x[1] - x[0])
            _SATURATION[key] = float((density * self.saturated(x).double()).sum())
        return _SATURATION[key]

    @property
    def second_moment(self) -> float:
        """``E[f(z)^2]`` for ``z ~ N(0, 1)`` by Gauss-Hermite quadrature (computed once per kind and parameters)."""
        return _numeric_constants(self)[1]

    @property
    def gradient_power(self) -> float:
        """``E[f'(z)^2]`` for ``z ~ N(0, 1)`` by Gauss-Hermite quadrature (once per kind and parameters): what a
        healthy unit-variance layer passes back of the gradient's power, the denominator of ``act_transmission``
        (1/2 for ReLU; mean-field theory's chi_1 is ``sigma_w^2`` times it at unit pre-activation variance)."""
        key = (id(self.kind), self.params, "gradient_power")
        if key not in _SATURATION:
            _SATURATION[key] = self._mean_square_slope(1.0)
        return _SATURATION[key]

    def _mean_square_slope(self, std: float) -> float:
        """``E[f'(std z)^2]``, ``z ~ N(0, 1)``, on a dense grid (kinks and jumps of f' defeat Gauss-Hermite)."""
        z = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
        density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
        slope = self.derivative(z * std).double().nan_to_num(0.0)
        return float((density * slope * slope).sum())

    @property
    def slope_is_indicator(self) -> bool:
        """``f'^2`` is 1 off the asymptotes and 0 on them (ReLU, ReLU6, hardtanh, identity): then the sum of ``f'^2``
        over a tensor is its count of unsaturated elements, which the monitors already have (checked on a grid once
        per kind and parameters, away from the bounds themselves)."""
        key = (id(self.kind), self.params, "indicator")
        if key not in _SATURATION:
            low, high = self.asymptotes
            x = _GRID[((_GRID - low).abs() > 1e-3) & ((_GRID - high).abs() > 1e-3)]
            square = self.derivative(x).double() ** 2
            _SATURATION[key] = bool(torch.allclose(square, (~self.saturated(x)).double(), atol=1e-9))
        return _SATURATION[key]

    def transmission(self, std: float) -> float:
        """``E[f'(s z)^2] / E[f'(z)^2]``: the gradient transmission of a layer whose pre-activation is
        ``N(0, std^2)`` (1 at std 1 by definition; for tanh it falls as the input spreads onto the flat ends)."""
        return self._mean_square_slope(std) / self.gradient_power

    @property
    def gain(self) -> float:
        """Numeric init gain ``g = 1 / sqrt(E[f(z)^2])``, ``z ~ N(0, 1)`` (exact √2 for ReLU)."""
        return 1.0 / math.sqrt(self.second_moment)

    def with_params(self, **params: Any) -> Activation:
        """The same kind with other parameters: ``get_activation("gelu").with_params(approximate="tanh")``."""
        return Activation(self.kind, tuple(sorted({**self.kwargs, **params}.items())))

    def describe(self) -> str:
        if not self.params:
            return self.kind.name
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.kind.name}({inner})"


_CONSTANTS: dict[tuple[int, tuple], tuple[float, float, tuple[float, float]]] = {}
_SATURATION: dict[tuple, float] = {}


def _asymptotes(slope: Tensor, threshold: float) -> tuple[float, float]:
    """Where ``slope`` (on :data:`_GRID`) stays below ``threshold`` out to the grid's ends."""
    flat = slope < threshold
    if bool(flat.all()):
        return -math.inf, math.inf  # no slope anywhere: nothing to call saturated
    steep = torch.nonzero(~flat).reshape(-1)
    first, last = int(steep[0]), int(steep[-1])
    # grid points snapped to 1e-9 (linspace puts 0 at -6e-16): ReLU's bound is exactly 0, so relu(0) is saturated
    low = round(float(_GRID[first - 1]), 9) + 0.0 if first > 0 else -math.inf
    high = round(float(_GRID[last + 1]), 9) + 0.0 if last < len(_GRID) - 1 else math.inf
    return low, high


def _numeric_constants(act: Activation) -> tuple[float, float, tuple[float, float]]:
    """(max |f'|, E[f(z)^2], asymptotes) of an activation, memoized by kind and parameters."""
    key = (id(act.kind), act.params)
    if key not in _CONSTANTS:
        slope = act.derivative(_GRID).abs()
        max_derivative = float(slope.max())
        nodes, weights = np.polynomial.hermite_e.hermegauss(_QUADRATURE_POINTS)
        values = act(torch.from_numpy(nodes)).double().numpy()
        second_moment = float(np.sum(weights * values**2) / math.sqrt(2 * math.pi))
        _CONSTANTS[key] = (max_derivative, second_moment, _asymptotes(slope, SATURATION_THRESHOLD * max_derivative))
    return _CONSTANTS[key]


_REGISTRY: dict[str, ActivationKind] = {}
_BY_MODULE: dict[type[nn.Module], ActivationKind] = {}
_BY_FUNCTION: dict[Any, ActivationKind] = {}


def register_activation(kind: ActivationKind, *, overwrite: bool = False) -> ActivationKind:
    """Add a kind to the registry so detection, monitoring and init all know it.

    Raises:
        ValueError: if the name (normalized) is taken and ``overwrite`` is False.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Square(nn.Module):
        ...     def forward(self, x):
        ...         return x * x
        >>> _ = register_activation(ActivationKind("square_demo", lambda x: x * x, modules=(Square,)), overwrite=True)
        >>> get_activation(Square()).name
        'square_demo'
    """
    key = _normalize(kind.name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"Expected a new activation name but got {kind.name!r}, which is already registered")
    _REGISTRY[key] = kind
    for cls in kind.modules:
        _BY_MODULE[cls] = kind
    for fn in kind.functions:
        _BY_FUNCTION[fn] = kind
    return kind


def registered_kinds() -> list[ActivationKind]:
    """Every registered kind, in registration order."""
    return list(_REGISTRY.values())


def available_activations() -> list[str]:
    """Canonical names of every registered kind."""
    return sorted(kind.name for kind in _REGISTRY.values())


def _from_kind(kind: ActivationKind, **params: Any) -> Activation:
    if kind.param_values is not None and params:
        params = kind.param_values(params)
    merged = {**kind.defaults, **params}
    return Activation(kind, tuple(sorted(merged.items())))


def activation_of_module(module: nn.Module) -> Activation | None:
    """The activation a module implements, with its parameters, or ``None`` if it is not an activation."""
    kind = _BY_MODULE.get(type(module))
    if kind is None:
        return None
    params = {p: getattr(module, attr) for p, attr in kind.module_params.items() if hasattr(module, attr)}
    return _from_kind(kind, **params)


def activation_of_call(func: Any, args: tuple = (), kwargs: dict | None = None) -> Activation | None:
    """The activation a functional call (``F.gelu(x, approximate="tanh")``) computes, or ``None``."""
    kind = _BY_FUNCTION.get(func)
    if kind is None:
        return None
    kwargs = kwargs or {}
    params = {}
    for param, (position, keyword) in kind.call_params.items():
        if keyword in kwargs:
            params[param] = kwargs[keyword]
        elif len(args) > position:
            params[param] = args[position]
    return _from_kind(kind, **params)


def get_activation(spec: str | type[nn.Module] | nn.Module | Activation | Callable | None) -> Activation:
    """Resolve a name, module class, module instance, functional or ``None`` (identity) to an :class:`Activation`.

    Names are normalized: ``"leaky_relu"``, ``"LeakyReLU"`` and ``"leakyrelu"`` are the same.

    Raises:
        ValueError: for a name or object that is no registered activation; the message lists the known names.

    Example::

        >>> get_activation("LeakyReLU").describe()
        'leaky_relu(negative_slope=0.01)'
    """
    if spec is None:
        return _from_kind(_REGISTRY["identity"])
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        kind = _REGISTRY.get(_normalize(spec))
        if kind is not None:
            return _from_kind(kind)
    elif isinstance(spec, nn.Module):
        found = activation_of_module(spec)
        if found is not None:
            return found
    elif isinstance(spec, type) and spec in _BY_MODULE:
        return _from_kind(_BY_MODULE[spec])
    elif spec in _BY_FUNCTION:
        return _from_kind(_BY_FUNCTION[spec])
    raise ValueError(f"Expected an activation, one of {available_activations()}, but got {spec!r}")
