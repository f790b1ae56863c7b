"""Recognize an activation by what it computes: a module or callable acting element-wise, matched numerically.

:func:`recognize` evaluates the candidate on a grid of inputs, checks that it acts element-wise (the same value
wherever an input sits, nothing mixed between elements), and compares it with every registered kind
(:mod:`lightning_bn.activations`) and the common parameter variants (GELU's tanh approximation, a leaky slope). What
matches within float32 rounding is that kind; an element-wise function that equals its input is a *placeholder*
(``nn.Identity``, dropout and drop-path in eval mode); an element-wise nonlinearity no kind matches gets a kind of its
own, built from the function and its numerically estimated derivative (saturation is still ``|f'| < 1%`` of its max):
it is reported as found "by behaviour". Linear maps (``x * c``) are no activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_bn.activations import Activation, ActivationKind, activation_of_module, get_activation, registered_kinds

__all__ = ["Recognition", "recognize"]

_GRID_POINTS = 2049
_LIMIT = 8.0
#: Largest difference, relative to ``1 + |f(x)|``, at which a candidate equals a registered kind (float32 rounding
#: is ~1e-7; GELU's tanh approximation differs from the exact GELU by up to 5e-4).
_TOLERANCE = 2e-5
_STEP = 1e-2  # central-difference step of the derivative of a kind found by behaviour


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


def _close(a: Tensor, b: Tensor) -> bool:
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.all()):
        return False
    return bool(((a - b).abs() <= _TOLERANCE * (1 + b.abs())).all())


def _elementwise(fn: Callable[[Tensor], Any], x: Tensor, y: Tensor) -> bool:
    flipped = _call(fn, x.flip(-1))
    half = x.shape[-1] // 2
    part = _call(fn, x[..., :half].contiguous())
    return flipped is not None and part is not None and _close(flipped.flip(-1), y) and _close(part, y[..., :half])


def _candidates(x: Tensor, y: Tensor) -> list[Activation]:
    """Registered kinds with their defaults, and the parameter variants read off the values."""
    found = [get_activation(kind.name) for kind in registered_kinds()]
    found.append(get_activation("gelu").with_params(approximate="tanh"))
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    at_minus_one = int(torch.argmin((flat_x + 1).abs()))
    slope = -float(flat_y[at_minus_one])
    if 0 < slope < 1:
        found.append(get_activation("leaky_relu").with_params(negative_slope=slope))
    return found


def _is_linear(x: Tensor, y: Tensor) -> bool:
    x64, y64 = x.reshape(-1).double(), y.reshape(-1).double()
    design = torch.stack([x64, torch.ones_like(x64)], dim=1)
    solution = torch.linalg.lstsq(design, y64.unsqueeze(1)).solution
    return _close(design @ solution, y64.unsqueeze(1))


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
        if any(True for _ in fn.parameters(recurse=True)) or any(True for _ in fn.children()):
            return None  # weights or submodules: a layer or a block, not a function of one element
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
