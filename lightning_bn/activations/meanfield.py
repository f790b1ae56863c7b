"""Mean-field signal propagation of an activation: the variance map, χ₁, and the critical initialization.

For a deep stack ``h_{l+1} = W φ(h_l) + b`` with weights ``N(0, σ_w²/fan_in)`` and biases ``N(0, σ_b²)``, at infinite
width the pre-activations are Gaussian with variance ``q_l`` (Poole et al. 2016; Schoenholz et al. 2017):

- the variance map ``q_{l+1} = σ_w² E[φ(√q_l z)²] + σ_b²``, ``z ~ N(0, 1)``, with fixed point ``q*``;
- ``χ₁ = σ_w² E[φ′(√q* z)²]``: the factor by which one layer multiplies the back-propagated gradient's power.
  ``χ₁ < 1`` is the ordered phase (gradients vanish with depth), ``χ₁ > 1`` the chaotic one (they explode);
  ``χ₁ = 1`` is critical, where signals travel furthest in both directions.

The critical point at unit pre-activation variance (``q* = 1``) is ``σ_w² = 1/E[φ′(z)²]``,
``σ_b² = 1 − E[φ(z)²]/E[φ′(z)²]``; where that ``σ_b²`` is negative (sigmoid, hard sigmoid: their mean is not 0),
``σ_b = 0`` and ``σ_w²`` is solved numerically so that ``χ₁(q*(σ_w²)) = 1``. The point is usable only where ``q*`` is
a stable fixed point of the variance map: its slope there, ``χ₁ + σ_w² E[φφ″]``, must be below 1 (GELU, SiLU and
Mish fail this: a small deviation of the variance grows layer after layer). Positively homogeneous kinds (ReLU,
leaky ReLU, identity) have slope exactly 1: every ``q`` is a fixed point and ``σ_w² = 1/E[φ′(z)²]`` is He's init.

Expectations are computed on a dense grid (kinks and jumps of ``φ′`` defeat Gauss-Hermite quadrature); the slope of
the map is a central difference of ``E[φ(√q z)²]`` in ``q``, which needs no ``φ″`` (it equals ``χ₁ + σ_w² E[φφ″]``
by Stein's lemma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_bn.activations.registry import Activation

__all__ = ["CriticalPoint", "chi1", "critical_point", "fixed_point", "mean_square", "mean_square_slope"]

_Z = torch.linspace(-10.0, 10.0, 8000, dtype=torch.float64)  # 0 is no node: kinks there (ReLU) count by halves
_W = torch.exp(-0.5 * _Z * _Z) / math.sqrt(2 * math.pi) * (_Z[1] - _Z[0])
_CACHE: dict[tuple, CriticalPoint] = {}


def mean_square(activation: Activation, q: float) -> float:
    """``E[φ(√q z)²]``, ``z ~ N(0, 1)``."""
    values = activation(_Z * math.sqrt(q)).double().nan_to_num(0.0)
    return float((_W * values * values).sum())


def mean_square_slope(activation: Activation, q: float) -> float:
    """``E[φ′(√q z)²]``, ``z ~ N(0, 1)``."""
    slope = activation.derivative(_Z * math.sqrt(q)).double().nan_to_num(0.0)
    return float((_W * slope * slope).sum())


def chi1(activation: Activation, weight_variance: float, q: float) -> float:
    """``χ₁ = σ_w² E[φ′(√q z)²]``: the per-layer factor on the back-propagated gradient power at variance ``q``."""
    return weight_variance * mean_square_slope(activation, q)


def fixed_point(activation: Activation, weight_variance: float, bias_variance: float = 0.0) -> float:
    """The largest fixed point ``q*`` of ``q ↦ σ_w² E[φ(√q z)²] + σ_b²`` (bisection; ``nan`` where the map has none
    below 1e8: an activation growing as fast as the identity with ``σ_w² > 1``)."""

    def gap(q: float) -> float:
        return weight_variance * mean_square(activation, q) + bias_variance - q

    high = 1.0
    while gap(high) > 0:
        high *= 2.0
        if high > 1e8:
            return math.nan
    low = high / 2.0
    while low > 1e-12 and gap(low) <= 0:
        low /= 2.0
    if gap(low) <= 0:
        return 0.0
    for _ in range(80):
        middle = math.sqrt(low * high)
        if gap(middle) > 0:
            low = middle
        else:
            high = middle
    return math.sqrt(low * high)


@dataclass(frozen=True)
class CriticalPoint:
    """The critical initialization of one activation (weights ``N(0, weight_variance / fan_in)``, biases
    ``N(0, bias_variance)``).

    Attributes:
        activation: what it is for.
        weight_variance: ``σ_w²``.
        bias_variance: ``σ_b²``.
        q: the pre-activation variance ``q*`` the stack settles at.
        chi1: ``χ₁`` there (1 up to the solver's precision).
        slope: the slope of the variance map at ``q*`` (``χ₁ + σ_w² E[φφ″]``).
        stable: whether ``q*`` attracts (slope < 1) or is neutral (slope 1 within 1e-3: a positively homogeneous kind,
            whose every ``q`` is a fixed point).
        reason: why the point is not usable, in words (``None`` when it is).
    """

    activation: Activation
    weight_variance: float
    bias_variance: float
    q: float
    chi1: float
    slope: float
    stable: bool
    reason: str | None = None

    @property
    def gain(self) -> float:
        """``σ_w``: the gain of a ``g / √fan_in`` init."""
        return math.sqrt(self.weight_variance)

    def describe(self) -> str:
        return (f"σ_w² {self.weight_variance:.4g}, σ_b² {self.bias_variance:.4g} (q* {self.q:.3g}, "
                f"χ₁ {self.chi1:.3f})")  # fmt: skip


def critical_point(activation: Activation) -> CriticalPoint:
    """The critical point of an activation (computed once per kind and parameters).

    Example::

        >>> from lightning_bn.activations import get_activation
        >>> point = critical_point(get_activation("tanh"))
        >>> round(point.weight_variance, 3), round(point.bias_variance, 3), round(point.chi1, 3), point.stable
        (2.153, 0.151, 1.0, True)
        >>> critical_point(get_activation("gelu")).stable
        False
    """
    key = (id(activation.kind), activation.params)
    if key not in _CACHE:
        _CACHE[key] = _solve(activation)
    return _CACHE[key]


def _solve(activation: Activation) -> CriticalPoint:
    slope_power = mean_square_slope(activation, 1.0)
    if not slope_power > 0:
        why = f"{activation.describe()} has no slope (E[φ′(z)²] = 0): no signal passes back"
        return CriticalPoint(activation, math.nan, math.nan, math.nan, math.nan, math.nan, False, why)
    weight_variance = 1.0 / slope_power
    bias_variance = 1.0 - mean_square(activation, 1.0) * weight_variance
    q = 1.0
    if activation.kind.homogeneous:  # E[φ²] = E[φ′²] · 1 exactly: He's init, σ_b = 0 (grid rounding aside)
        bias_variance = 0.0
    if bias_variance < -1e-6:  # the mean of φ is not 0 (sigmoid): no unit-variance point; σ_b = 0, solve for σ_w²
        bias_variance = 0.0
        weight_variance, q = _solve_without_bias(activation, weight_variance)
        if not math.isfinite(weight_variance):
            return CriticalPoint(activation, math.nan, math.nan, math.nan, math.nan, math.nan, False,
                                 f"{activation.describe()}: no σ_w² gives χ₁ = 1 at σ_b = 0")  # fmt: skip
    bias_variance = bias_variance if bias_variance > 1e-6 else 0.0
    chi = chi1(activation, weight_variance, q)
    step = 1e-3 * q
    slope = weight_variance * (mean_square(activation, q + step) - mean_square(activation, q - step)) / (2 * step)
    stable = slope < 1.0 + 1e-3  # slope 1 (ReLU, leaky ReLU, ReLU6 at q* = 1): neutral, every nearby q stays put
    reason = None
    if not stable:
        reason = (
            f"the critical point of {activation.describe()} (σ_w² {weight_variance:.4g}, σ_b² {bias_variance:.4g}) is "
            f"an unstable fixed point of the variance map (slope {slope:.3f} > 1): a small deviation of the "
            "pre-activation variance grows with depth"
        )
    return CriticalPoint(activation, weight_variance, bias_variance, q, chi, slope, stable, reason)


def _solve_without_bias(activation: Activation, start: float) -> tuple[float, float]:
    """``(σ_w², q*)`` with ``χ₁(q*(σ_w²)) = 1`` at ``σ_b = 0``, by bisection on ``log σ_w²`` from ``start`` up."""

    def excess(weight_variance: float) -> tuple[float, float]:
        q = fixed_point(activation, weight_variance)
        if not math.isfinite(q) or q <= 0:
            return math.nan, q
        return chi1(activation, weight_variance, q) - 1.0, q

    low, high = start, start
    value, _ = excess(high)
    if not math.isfinite(value):
        return math.nan, math.nan
    direction = 2.0 if value < 0 else 0.5
    for _ in range(40):  # bracket the root
        candidate = high * direction
        found, _ = excess(candidate)
        if not math.isfinite(found):
            return math.nan, math.nan
        low, high = high, candidate
        if (found < 0) != (value < 0):
            break
        value = found
    else:
        return math.nan, math.nan
    low, high = min(low, high), max(low, high)
    for _ in range(60):
        middle = math.sqrt(low * high)
        found, _ = excess(middle)
        if found < 0:
            low = middle
        else:
            high = middle
    weight_variance = math.sqrt(low * high)
    return weight_variance, fixed_point(activation, weight_variance)
