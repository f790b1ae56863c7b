"""Recognize an activation by what it computes: a module or callable acting element-wise, matched numerically.

:func:`recognize` evaluates the candidate on a grid of inputs, checks that it acts element-wise (the same value
wherever an input sits, nothing mixed between elements), and compares it with every registered kind
(:mod:`lightning_bn.activations`) and the common parameter variants (GELU's tanh approximation, a leaky slope). What
matches within float32 rounding is that kind; an element-wise function that equals its input is a *placeholder*
(``nn.Identity``, dropout and drop-path in eval mode); an element-wise nonlinearity no kind matches gets a kind of its
own, built from the function and its numerically estimated derivative (saturation is still ``|f'| < 1%`` of its max):
it is reported as found "by behaviour". Linear maps (``x * c``) are no activation. A module may hold parameters (a
learnable swish ``x * sigmoid(beta * x)``): it is judged by what it computes with their current values.

:func:`recognize_samples` does the same from paired samples ``(x, f(x))`` of a function the trace cannot call (a
composite written in ``forward`` with per-channel constants): registered kinds are compared on the samples, and an
unmatched nonlinearity gets a kind fitted to them (a least-squares linear spline).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_bn.activations import Activation, ActivationKind, activation_of_module, get_activation, registered_kinds

__all__ = ["Recognition", "recognize", "recognize_samples"]

_GRID_POINTS = 2049
_LIMIT = 8.0
#: Largest difference, relative to ``1 + |f(x)|``, at which a candidate equals a registered kind (float32 rounding
#: is ~1e-7; GELU's tanh approximation differs from the exact GELU by up to 5e-4).
_TOLERANCE = 2e-5
_STEP = 1e-2  # central-difference step of the derivative of a kind found by behaviour
_KNOTS = 24  # most pieces of a kind fitted to samples (a linear spline, knots at quantiles of the samples)


@dataclass(frozen=True)
class Recognition:
    """What a module or callable is, by behaviour.

    Attributes:
        activation: the activation it computes (identity for placeholders).
        how: ``"registry"`` (its class or function is registered), ``"numeric"`` (it computes a registered kind),
            ``"behaviour"`` (an element-wise nonlinearity no kind matches) or ``"placeholder"`` (it returns its
            input).
    """

    activation: Activation
    how: Literal["registry", "numeric", "behaviour", "placeholder"]

    @property
    def is_placeholder(self) -> bool:
        return self.how == "placeholder"


def _grid(like: Tensor | None) -> Tensor:
    dtype = like.dtype if like is not None and like.dtype in (torch.float32, torch.float64) else torch.float32
    device = like.device if like is not None else "cpu"
    x = torch.linspace(-_LIMIT, _LIMIT, _GRID_POINTS, dtype=dtype, device=device)
    ndim = max(like.ndim, 1) if like is not None else 1
    return x.reshape((1,) * (ndim - 1) + (-1,))


def _call(fn: Callable[[Tensor], Any], x: Tensor) -> Tensor | None:
    try:
        with torch.no_grad():
            y = fn(x.clone())
    except Exception:  # not callable on a plain tensor of this shape: not an element-wise function
        return None
    if isinstance(y, (tuple, list)) and len(y) == 1:
        y = y[0]
    if not isinstance(y, Tensor) or y.shape != x.shape or not y.is_floating_point():
        return None
    return y


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of a comparison of values computed in ``dtype``: :data:`_TOLERANCE` for float32 and
    float64, a few rounding steps for half precision."""
    return max(_TOLERANCE, 16 * torch.finfo(dtype).eps) if dtype.is_floating_point else _TOLERANCE


def _close(a: Tensor, b: Tensor, tol: float = _TOLERANCE) -> bool:
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.all()):
        return False
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def _elementwise(fn: Callable[[Tensor], Any], x: Tensor, y: Tensor) -> bool:
    flipped = _call(fn, x.flip(-1))
    half = x.shape[-1] // 2
    part = _call(fn, x[..., :half].contiguous())
    return flipped is not None and part is not None and _close(flipped.flip(-1), y) and _close(part, y[..., :half])


def _candidates(x: Tensor, y: Tensor) -> list[Activation]:
    """Registered kinds with their defaults, and the parameter variants read off the values."""
    # kinds with learned per-unit parameters (PReLU) are found by their class, never by a function's values
    found = [get_activation(kind.name) for kind in registered_kinds() if kind.unit_asymptotes is None]
    found.append(get_activation("gelu").with_params(approximate="tanh"))
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    at_minus_one = int(torch.argmin((flat_x + 1).abs()))
    slope = -float(flat_y[at_minus_one])
    if 0 < slope < 1:
        found.append(get_activation("leaky_relu").with_params(negative_slope=slope))
    return found


def _is_linear(x: Tensor, y: Tensor, tol: float = _TOLERANCE) -> bool:
    x64, y64 = x.reshape(-1).double(), y.reshape(-1).double()
    design = torch.stack([x64, torch.ones_like(x64)], dim=1)
    solution = torch.linalg.lstsq(design, y64.unsqueeze(1)).solution
    return _close(design @ solution, y64.unsqueeze(1), tol)


def _behaviour_kind(name: str, fn: Callable[[Tensor], Any]) -> ActivationKind:
    def forward(x: Tensor) -> Tensor:
        y = fn(x)
        return y[0] if isinstance(y, (tuple, list)) else y

    def derivative(x: Tensor) -> Tensor:
        """Central differences at two step sizes; where they disagree the function jumps (``nn.Threshold``), and a
        jump is no slope: it reads 0 there, so it never sets ``max |f'|`` (913 for ``Threshold(0.1, 20)`` otherwise)."""
        h = _STEP * (1 + x.abs())
        with torch.no_grad():
            wide = (forward(x + h) - forward(x - h)) / (2 * h)
            narrow = (forward(x + h / 4) - forward(x - h / 4)) / (h / 2)
        jump = (wide - narrow).abs() > 0.1 * torch.maximum(wide.abs(), narrow.abs()) + 1e-6
        return torch.where(jump, torch.zeros_like(wide), narrow)

    return ActivationKind(f"{name} (by behaviour)", forward, derivative, init="numeric")


def _name_of(fn: Any) -> str:
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", type(fn).__name__)


def recognize(fn: nn.Module | Callable[[Tensor], Any], like: Tensor | None = None) -> Recognition | None:
    """What ``fn`` computes, judged on a grid of inputs over [-8, 8], or ``None`` if it is no element-wise function.

    Args:
        fn: a module (its registered class wins, else it is called) or a callable of one tensor.
        like: an input ``fn`` really receives: the grid takes its dtype, device and rank.

    Example::

        >>> import torch.nn.functional as F
        >>> class NewGELU(nn.Module):  # transformers' gelu_new, written out
        ...     def forward(self, x):
        ...         return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        >>> recognize(NewGELU()).activation.describe(), recognize(NewGELU()).how
        ('gelu(approximate=tanh)', 'numeric')
        >>> recognize(nn.Dropout().eval()).how, recognize(lambda x: x * torch.sigmoid(1.702 * x)).activation.name
        ('placeholder', 'quick_gelu')
        >>> recognize(lambda x: x.softmax(-1)) is None
        True
    """
    if isinstance(fn, nn.Module):
        registered = activation_of_module(fn)
        if registered is not None:
            return Recognition(registered, "placeholder" if registered.is_identity else "registry")
        if any(True for _ in fn.children()):
            return None  # submodules: a block, not a function of one element (a leaf's own parameters may be)
    call = fn.forward if isinstance(fn, nn.Module) else fn  # no hooks: the trace may be watching this module
    x = _grid(like)
    y = _call(call, x)
    if y is None or not _elementwise(call, x, y):
        return None
    if _close(y, x):
        return Recognition(get_activation(None), "placeholder")
    if _is_linear(x, y):
        return None
    for candidate in _candidates(x, y):
        if candidate.is_identity:
            continue
        if _close(y, candidate(x.double()).to(y.dtype)):
            return Recognition(candidate, "numeric")
    kind = _behaviour_kind(_name_of(fn), call)
    if not math.isfinite(Activation(kind).max_derivative):
        return None
    return Recognition(Activation(kind), "behaviour")


def _sampled_kind(name: str, x: Tensor, y: Tensor) -> ActivationKind | None:
    """A kind fitted to samples ``(x, y)`` (float64, finite): a linear spline, least squares, with knots at up to
    :data:`_KNOTS` quantiles of ``x`` (at least 128 samples a piece, so the slopes are no noise: a function per
    channel averages out), linear beyond the ends; its derivative is the slope of each piece. ``None`` with fewer
    than two distinct knots."""
    pieces = min(_KNOTS, max(x.numel() // 128, 3))
    knots = torch.unique(torch.quantile(x, torch.linspace(0, 1, pieces + 1, dtype=x.dtype)))
    if knots.numel() < 2:
        return None

    def hats(t: Tensor, xs: Tensor) -> Tensor:
        """The linear B-spline basis at ``t`` (one column per knot), linear beyond the end knots."""
        i = torch.searchsorted(xs, t.contiguous()).clamp(1, xs.numel() - 1)
        w = (t - xs[i - 1]) / (xs[i] - xs[i - 1])
        basis = torch.zeros(t.numel(), xs.numel(), dtype=t.dtype, device=t.device)
        rows = torch.arange(t.numel(), device=t.device)
        basis[rows, i - 1] = 1 - w
        basis[rows, i] = w
        return basis

    values = torch.linalg.lstsq(hats(x, knots), y.unsqueeze(1)).solution.reshape(-1)

    def piece(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xs, ys = knots.to(t.device, t.dtype), values.to(t.device, t.dtype)
        i = torch.searchsorted(xs, t.contiguous()).clamp(1, xs.numel() - 1)
        return xs[i - 1], xs[i], ys[i - 1], ys[i]

    def forward(t: Tensor) -> Tensor:
        x0, x1, y0, y1 = piece(t)
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)

    def derivative(t: Tensor) -> Tensor:
        x0, x1, y0, y1 = piece(t)
        return (y1 - y0) / (x1 - x0)

    return ActivationKind(f"{name} (by behaviour)", forward, derivative, init="numeric")


def recognize_samples(x: Tensor, y: Tensor, name: str = "composite") -> Recognition | None:
    """What an element-wise function computes, judged from paired samples ``y = f(x)`` alone (the values a layer's
    output took and what the function made of them), or ``None`` where the samples cannot tell (fewer than two
    distinct finite values).

    The samples equal to ``x``, or a linear map of it: a placeholder (no activation). A registered kind (or a
    parameter variant) equal to them within :func:`tolerance` of ``y``'s dtype: that kind, ``"numeric"``. Any other
    nonlinearity: a kind fitted to the samples (a linear spline, ``"<name> (by behaviour)"``, ``init="numeric"``), so
    an initializer still gets a gain and a data-driven rescale.

    Example::

        >>> x = torch.linspace(-4, 4, 801)
        >>> recognize_samples(x, x * torch.sigmoid(x)).activation.name
        'silu'
        >>> found = recognize_samples(x, x * torch.sigmoid(x) ** 2)
        >>> found.how, found.activation.name
        ('behaviour', 'composite (by behaviour)')
    """
    tol = tolerance(y.dtype)
    x, y = x.detach().reshape(-1).double().cpu(), y.detach().reshape(-1).double().cpu()
    finite = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[finite], y[finite]
    if x.numel() < 2 or float(x.max() - x.min()) <= 0:
        return None
    if _close(y, x, tol) or _is_linear(x, y, tol):
        return Recognition(get_activation(None), "placeholder")
    for candidate in _candidates(x, y):
        if not candidate.is_identity and _close(y, candidate(x), tol):
            return Recognition(candidate, "numeric")
    kind = _sampled_kind(name, x, y)
    return None if kind is None else Recognition(Activation(kind), "behaviour")
