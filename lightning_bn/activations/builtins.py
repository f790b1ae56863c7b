"""The built-in activation kinds: each with its module and functional forms, derivative and recommended init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bn.activations.registry import SATURATION_THRESHOLD, ActivationKind, register_activation

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _positive(y: Tensor) -> Tensor:
    """1.0 where ``y > 0`` else 0.0, in vectorized float ops (bool comparisons are slow on CPU)."""
    return torch.sign(y).clamp_min_(0)


def _inside(y: Tensor, low: float, high: float) -> Tensor:
    """1.0 where ``low < y < high`` else 0.0, for ``y`` already clipped to ``[low, high]``."""
    return torch.sign(y - low) * torch.sign(high - y)


def _step(x: Tensor, low: float, high: float) -> Tensor:
    return ((x > low) & (x < high)).to(x.dtype)


def _gelu_derivative(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def _silu_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


_QUICK_GELU_SLOPE = 1.702


def _quick_gelu_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(_QUICK_GELU_SLOPE * x)
    return s * (1 + _QUICK_GELU_SLOPE * x * (1 - s))


def _mish_derivative(x: Tensor) -> Tensor:
    t = torch.tanh(F.softplus(x))
    return t + x * torch.sigmoid(x) * (1 - t * t)


def _elu_derivative(x: Tensor, alpha: float = 1.0) -> Tensor:
    return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(torch.clamp(x, max=0)))


def _hardswish_derivative(x: Tensor) -> Tensor:
    middle = (2 * x + 3) / 6
    return torch.where(x <= -3, torch.zeros_like(x), torch.where(x >= 3, torch.ones_like(x), middle))


def _mean_slope(params: dict) -> dict:
    """PReLU's slope read from a module or a call is its weight tensor: the mean slope stands for it (gain, derivative,
    transmission); saturation is judged per channel from :func:`_prelu_bounds`."""
    slope = params.get("negative_slope")
    if isinstance(slope, Tensor):
        params = {**params, "negative_slope": round(float(slope.detach().float().mean()), 6)}
    return params


def _prelu_bounds(module: nn.Module, ndim: int) -> tuple[Tensor, Tensor]:
    """Per-channel asymptotes of a PReLU from its current weight: a channel whose learned slope ``a`` is below 1% of
    its largest slope ``max(1, |a|)`` is saturated at or below 0 (a ReLU there: it can die); the side of slope 1 is
    saturated only where ``|a| > 100``. Shaped like ``F.prelu`` applies the weight: along dim 1 (dim 0 of a 1-D input).
    """
    slope = module.weight.detach().float().reshape(-1)
    peak = slope.abs().clamp_min(1.0)
    zero, inf = torch.zeros_like(slope), torch.full_like(slope, math.inf)
    low = torch.where(slope.abs() < SATURATION_THRESHOLD * peak, zero, -inf)
    high = torch.where(1.0 < SATURATION_THRESHOLD * peak, zero, inf)
    shape = [1] * max(ndim, 1)
    shape[1 if ndim >= 2 else 0] = -1
    return low.reshape(shape), high.reshape(shape)


_T = torch.Tensor
_BUILTINS = [
    ActivationKind(
        "identity",
        lambda x: x,
        lambda x: torch.ones_like(x),
        modules=(nn.Identity,),
        init="xavier",
        homogeneous=True,
        output_derivative=lambda y: torch.ones_like(y),
    ),
    ActivationKind(
        "sigmoid",
        torch.sigmoid,
        lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)),
        modules=(nn.Sigmoid,),
        functions=(torch.sigmoid, F.sigmoid, _T.sigmoid, _T.sigmoid_, torch.sigmoid_),
        init="xavier",
        output_derivative=lambda y: y * (1 - y),
    ),
    ActivationKind(
        "tanh",
        torch.tanh,
        lambda x: 1 - torch.tanh(x) ** 2,
        modules=(nn.Tanh,),
        functions=(torch.tanh, F.tanh, _T.tanh, _T.tanh_, torch.tanh_),
        init="xavier",
        output_derivative=lambda y: 1 - y * y,
    ),
    ActivationKind(
        "relu",
        torch.relu,
        _positive,
        modules=(nn.ReLU,),
        functions=(torch.relu, F.relu, F.relu_, torch.relu_, _T.relu, _T.relu_),
        init="kaiming",
        homogeneous=True,
        output_derivative=lambda y: torch.sign(y),
    ),
    ActivationKind(
        "leaky_relu",
        lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope),
        lambda x, negative_slope=0.01: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope)),
        modules=(nn.LeakyReLU,),
        functions=(F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu),
        init="kaiming",
        defaults={"negative_slope": 0.01},
        module_params={"negative_slope": "negative_slope"},
        call_params={"negative_slope": (1, "negative_slope")},
        homogeneous=True,
        output_derivative=lambda y, negative_slope=0.01: _positive(y) * (1 - negative_slope) + negative_slope,
    ),
    ActivationKind(
        "prelu",  # a learned slope per channel (He et al. 2015): Kaiming gain sqrt(2 / (1 + a^2)) at the mean slope a
        lambda x, negative_slope=0.25: F.leaky_relu(x, negative_slope),
        lambda x, negative_slope=0.25: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope)),
        modules=(nn.PReLU,),
        functions=(torch.prelu, _T.prelu),
        init="kaiming",
        defaults={"negative_slope": 0.25},
        module_params={"negative_slope": "weight"},
        call_params={"negative_slope": (1, "weight")},
        homogeneous=True,
        output_derivative=lambda y, negative_slope=0.25: _positive(y) * (1 - negative_slope) + negative_slope,
        param_values=_mean_slope,
        unit_asymptotes=_prelu_bounds,
    ),
    ActivationKind(
        "relu6",
        F.relu6,
        lambda x: _step(x, 0.0, 6.0),
        modules=(nn.ReLU6,),
        functions=(F.relu6,),
        init="kaiming",
        output_derivative=lambda y: _inside(y, 0.0, 6.0),
    ),
    ActivationKind(
        "elu",
        lambda x, alpha=1.0: F.elu(x, alpha),
        _elu_derivative,
        modules=(nn.ELU,),
        functions=(F.elu, F.elu_, torch._C._nn.elu),
        defaults={"alpha": 1.0},
        module_params={"alpha": "alpha"},
        call_params={"alpha": (1, "alpha")},
        output_derivative=lambda y, alpha=1.0: _positive(y) * (1 - alpha - y) + y + alpha,
    ),
    ActivationKind(
        "selu",
        torch.selu,
        lambda x: _SELU_SCALE * _elu_derivative(x, _SELU_ALPHA),
        modules=(nn.SELU,),
        functions=(torch.selu, F.selu, torch.selu_, F.selu_),
        init="lecun",
        output_derivative=lambda y: (
            _positive(y) * (_SELU_SCALE - _SELU_SCALE * _SELU_ALPHA - y) + y + _SELU_SCALE * _SELU_ALPHA
        ),
    ),
    ActivationKind(
        "celu",
        lambda x, alpha=1.0: F.celu(x, alpha),
        lambda x, alpha=1.0: torch.where(x > 0, torch.ones_like(x), torch.exp(torch.clamp(x, max=0) / alpha)),
        modules=(nn.CELU,),
        functions=(torch.celu, F.celu, torch.celu_, F.celu_),
        defaults={"alpha": 1.0},
        module_params={"alpha": "alpha"},
        call_params={"alpha": (1, "alpha")},
        output_derivative=lambda y, alpha=1.0: _positive(y) * (-y / alpha) + y / alpha + 1,
    ),
    ActivationKind(
        "gelu",
        lambda x, approximate="none": F.gelu(x, approximate=approximate),
        _gelu_derivative,
        modules=(nn.GELU,),
        functions=(F.gelu, torch._C._nn.gelu),
        defaults={"approximate": "none"},
        module_params={"approximate": "approximate"},
        call_params={"approximate": (1, "approximate")},
    ),
    ActivationKind(
        "silu",
        F.silu,
        _silu_derivative,
        modules=(nn.SiLU,),
        functions=(F.silu, torch._C._nn.silu),
    ),
    ActivationKind(
        "quick_gelu",  # x * sigmoid(1.702 x): CLIP's GELU approximation (transformers' QuickGELUActivation)
        lambda x: x * torch.sigmoid(_QUICK_GELU_SLOPE * x),
        _quick_gelu_derivative,
    ),
    ActivationKind(
        "mish",
        F.mish,
        _mish_derivative,
        modules=(nn.Mish,),
        functions=(F.mish, torch._C._nn.mish),
    ),
    ActivationKind(
        "softplus",
        lambda x, beta=1.0, threshold=20.0: F.softplus(x, beta, threshold),
        lambda x, beta=1.0, threshold=20.0: torch.where(
            x * beta > threshold, torch.ones_like(x), torch.sigmoid(beta * x)
        ),
        modules=(nn.Softplus,),
        functions=(F.softplus, torch._C._nn.softplus),
        defaults={"beta": 1.0, "threshold": 20.0},
        module_params={"beta": "beta", "threshold": "threshold"},
        call_params={"beta": (1, "beta"), "threshold": (2, "threshold")},
        output_derivative=lambda y, beta=1.0, threshold=20.0: -torch.expm1(-beta * y),
    ),
    ActivationKind(
        "hardtanh",
        lambda x, min_val=-1.0, max_val=1.0: F.hardtanh(x, min_val, max_val),
        lambda x, min_val=-1.0, max_val=1.0: _step(x, min_val, max_val),
        modules=(nn.Hardtanh,),
        functions=(F.hardtanh, F.hardtanh_, torch._C._nn.hardtanh),
        init="xavier",
        defaults={"min_val": -1.0, "max_val": 1.0},
        module_params={"min_val": "min_val", "max_val": "max_val"},
        call_params={"min_val": (1, "min_val"), "max_val": (2, "max_val")},
        output_derivative=lambda y, min_val=-1.0, max_val=1.0: _inside(y, min_val, max_val),
    ),
    ActivationKind(
        "hardswish",
        F.hardswish,
        _hardswish_derivative,
        modules=(nn.Hardswish,),
        functions=(F.hardswish, torch._C._nn.hardswish),
    ),
    ActivationKind(
        "hardsigmoid",
        F.hardsigmoid,
        lambda x: _step(x, -3.0, 3.0) / 6,
        modules=(nn.Hardsigmoid,),
        functions=(F.hardsigmoid, torch._C._nn.hardsigmoid),
        init="xavier",
        output_derivative=lambda y: _inside(y, 0.0, 1.0) / 6,
    ),
    ActivationKind(
        "softsign",
        F.softsign,
        lambda x: 1 / (1 + x.abs()) ** 2,
        modules=(nn.Softsign,),
        functions=(F.softsign,),
        init="xavier",
        output_derivative=lambda y: (1 - y.abs()) ** 2,
    ),
]

for _kind in _BUILTINS:
    register_activation(_kind)
