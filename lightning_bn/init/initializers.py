"""Initializers matched to the activation that follows a layer, in place (timm style): nothing here runs a model.

:func:`init_layer_` draws one layer's weights for a scheme and an activation's gain; :func:`layer_fans` gives the fans
every part of the library uses; :func:`zero_init_residual_` zeroes the last norm of each residual branch found by the
trace. The data-driven half (LSUV, rescaling to unit variance) is in :mod:`lightning_bn.init.sequential`.

References: Glorot & Bengio (AISTATS 2010); He et al. (ICCV 2015); Klambauer et al. (NeurIPS 2017, LeCun init for
SELU); Saxe et al. (ICLR 2014, orthogonal init); Mishkin & Matas (ICLR 2016, LSUV).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_bn.activations import Activation, get_activation
from lightning_bn.activations.meanfield import critical_point
from lightning_bn.init.sharded import local_tensor, unsharded_params
from lightning_bn.layers import (
    WeightSpec,
    available_layers,
    fixed_scale,
    get_layer_kind,
    layer_fans,
    scheme_std,
    sync_weights,
)
from lightning_bn.tracing import LAYER_TYPES, LayerTrace

__all__ = ["LAYER_TYPES", "SCHEMES", "init_layer_", "layer_fans", "match_scale_", "zero_init_residual_"]

#: Initialization schemes understood by :func:`init_layer_`.
SCHEMES = ("xavier", "kaiming", "lecun", "orthogonal", "numeric", "critical")

Scheme = Literal["xavier", "kaiming", "lecun", "orthogonal", "numeric", "critical"]
Distribution = Literal["normal", "uniform", "truncated_normal"]
FanMode = Literal["fan_in", "fan_out"]

_TRUNC_STD = 0.8796256610342398  # std of N(0, 1) truncated to [-2, 2]


# ---- initializers ------------------------------------------------------------------------------------------------


def _fill_(weight: Tensor, std: float, distribution: str, generator: torch.Generator | None) -> None:
    if distribution == "normal":
        nn.init.normal_(weight, 0.0, std, generator=generator)
    elif distribution == "uniform":
        bound = math.sqrt(3.0) * std
        nn.init.uniform_(weight, -bound, bound, generator=generator)
    else:
        scale = std / _TRUNC_STD
        nn.init.trunc_normal_(weight, 0.0, scale, -2 * scale, 2 * scale, generator=generator)


def _init_matrix_(
    weight: Tensor,
    scheme: str,
    fans: tuple[float, float],
    gain: float,
    distribution: str,
    mode: str,
    generator: torch.Generator | None,
) -> None:
    variance = scheme_std(scheme, fans[0], fans[1], gain, mode) ** 2
    if scheme == "orthogonal" and weight.dim() >= 2 and weight.shape[0] > 1:
        nn.init.orthogonal_(weight, generator=generator)
        weight.mul_(math.sqrt(variance * weight.numel() / weight.pow(2).sum().item()))
    else:
        _fill_(weight, math.sqrt(variance), distribution, generator)


def _check_choice(argument: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"Expected `{argument}` to be one of {list(allowed)} but got {value!r}")


def init_layer_(
    module: nn.Module,
    scheme: Scheme,
    activation: Activation | None = None,
    distribution: Distribution = "normal",
    mode: FanMode = "fan_in",
    gain: float | None = None,
    generator: torch.Generator | None = None,
    keep_bias: bool = False,
) -> float:
    """Initialize one layer's weights in place for the activation that follows it; biases to zero (or kept).

    Weights get zero mean and variance ``v``:

    - ``"xavier"`` (Glorot & Bengio 2010): ``v = g² · 2 / (fan_in + fan_out)``;
    - ``"kaiming"`` (He et al. 2015) and ``"numeric"``: ``v = g² / fan`` (``fan`` per ``mode``);
    - ``"lecun"``: ``v = 1 / fan`` (the self-normalizing init for SELU), ``g`` only if given explicitly;
    - ``"orthogonal"`` (Saxe et al. 2014): a random orthogonal matrix scaled to ``v = g² / fan``;
    - ``"critical"`` (Poole et al. 2016; Schoenholz et al. 2017): the mean-field critical point of the activation
      (:func:`lightning_bn.activations.meanfield.critical_point`): ``v = σ_w² / fan`` and biases drawn from
      ``N(0, σ_b²)`` instead of zeroed, so that ``χ₁ = σ_w² E[φ′(√q* z)²] = 1``: gradients neither vanish nor explode
      with depth (tanh: σ_w² 2.153, σ_b² 0.151; sigmoid: σ_w² 103, σ_b 0). ``gain`` is ignored.

    ``g`` is ``gain`` if given, else ``activation.gain`` = ``1 / sqrt(E[f(z)²])``, ``z ~ N(0, 1)``, by quadrature
    (√2 for ReLU as in ``torch.nn.init.calculate_gain``; ≈ 1.59 for tanh where PyTorch uses 5/3, and ≈ 1.0 for SELU
    where PyTorch uses 3/4: the numeric value is the one that keeps ``E[f(z)²]`` at the unit fixed point), else 1.
    Embeddings take ``fan_in = fan_out = 1`` (a lookup reads one row). RNN layers get the scheme on each gate's
    input weights with the gain of their own ``nonlinearity``, orthogonal recurrent weights (gain 1). Sharded
    (``DTensor``) parameters are drawn full-size and each rank keeps its slice (:mod:`lightning_bn.init.sharded`), so
    they get the unsharded values; that gathers, so call it on every rank, outside ``forward``. The draw lands in the
    weight forward uses (:class:`lightning_bn.layers.WeightSpec`): a weight-normalized layer gets it in ``v`` and
    ``g = ‖v‖``, timm's ``ScaledStdConv2d`` its standardized draw times a ``gain`` set to the draw's RMS; a weight
    whose scale a reparametrization fixes (spectral norm, ``StdConv2d``) is left as it is.

    Args:
        module: a registered layer (:mod:`lightning_bn.layers`: Linear, Conv, ConvTranspose, Embedding, RNN,
            MultiheadAttention, transformers' Conv1D, or a kind you registered).
        scheme: one of :data:`SCHEMES`.
        activation: the activation consuming the layer's output (``None``: identity).
        distribution: ``"normal"``, ``"uniform"`` or ``"truncated_normal"`` (truncated at ±2σ, rescaled so the
            variance is still ``v``).
        mode: ``"fan_in"`` (preserve forward variance) or ``"fan_out"`` (backward).
        gain: overrides the activation's gain.
        generator: random generator on the weights' device (``None``: the global one).
        keep_bias: leave the biases as they are (a deliberate bias: an LSTM's forget gate at 1; a frozen one), also
            under ``"critical"``.

    Returns:
        the gain used.

    Raises:
        ValueError: for an unknown scheme, distribution or mode; for ``"critical"`` with an activation whose critical
            point is unstable (GELU, SiLU, Mish) or does not exist (softplus), with the reason.
        TypeError: for a module that is no registered layer.

    Example::

        >>> layer = nn.Linear(512, 512)
        >>> init_layer_(layer, "kaiming", get_activation("relu"))  # doctest: +ELLIPSIS
        1.414...
        >>> round(layer.weight.var().item() * 512, 1), layer.bias.abs().max().item()
        (2.0, 0.0)
    """
    _check_choice("scheme", scheme, SCHEMES)
    _check_choice("distribution", distribution, ("normal", "uniform", "truncated_normal"))
    _check_choice("mode", mode, ("fan_in", "fan_out"))
    if gain is not None and (isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain)):
        raise ValueError(f"Expected `gain` to be a finite number or None but got {gain!r}")
    kind = get_layer_kind(module)
    if kind is None:
        raise TypeError(
            f"Expected a registered layer ({', '.join(available_layers())}) but got {type(module).__name__}"
        )
    if kind.recurrent:
        activation = get_activation(getattr(module, "nonlinearity", None))
    bias_std = 0.0
    if scheme == "critical":
        point = critical_point(activation or get_activation(None))
        if not point.stable:
            raise ValueError(f"Expected an activation with a stable critical point for `scheme='critical'` but got "
                             f"{point.activation.describe()}: {point.reason}")  # fmt: skip
        gain, bias_std = point.gain, math.sqrt(point.bias_variance)
    if gain is None:
        gain = 1.0 if scheme == "lecun" or activation is None else activation.gain
    with torch.no_grad(), unsharded_params(module):
        if kind.recurrent:
            if fixed_scale(module) is None:
                _init_rnn_(module, scheme, gain, distribution, mode, generator)
        else:
            for spec in kind.weights(module):
                if spec.fixed is not None:
                    continue  # a reparametrization fixes its scale (spectral norm, weight standardized): kept
                weight = spec.tensor(module)
                matrix = weight.T if spec.transposed else weight
                for chunk in matrix.chunk(spec.chunks, dim=0):
                    _init_matrix_(chunk, scheme, (spec.fan_in, spec.fan_out), gain, distribution, mode, generator)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None and spec.scale is None:
                    weight[module.padding_idx].zero_()
                if spec.scale is not None:
                    match_scale_(spec, module)
        for name, param in [] if keep_bias else module.named_parameters():
            if name in kind.bias_names or ("." not in name and name.startswith("bias")):
                if bias_std > 0:
                    _fill_(param, bias_std, "normal", generator)
                else:
                    param.zero_()
        sync_weights(module)
    return gain


def match_scale_(spec: WeightSpec, module: nn.Module) -> None:
    """Set ``spec``'s scale parameter so that the effective weight has the norm of the drawn ``spec.tensor`` along
    each entry of the scale (a weight norm's ``g = ‖v‖`` per row: the effective weight equals the draw; timm's
    ``ScaledStdConv2d.gain``: each standardized row gets the draw's RMS). A zero scale entry is first set to 1."""
    scale = spec.scale_tensor(module)
    with torch.no_grad():
        scale.masked_fill_(scale == 0, 1.0)
        drawn, effective = spec.tensor(module).detach().float(), spec.effective_weight(module).detach().float()
        shape = (1,) * (effective.dim() - scale.dim()) + tuple(scale.shape)
        dims = [d for d, n in enumerate(shape) if n == 1]

        def norm(t: Tensor) -> Tensor:
            return t.pow(2).sum(dim=dims, keepdim=True).sqrt() if dims else t.abs()

        ratio = norm(drawn) / norm(effective).clamp_min(torch.finfo(torch.float32).tiny)
        scale.mul_(ratio.reshape(scale.shape).to(scale.dtype))


def _init_rnn_(
    module: nn.RNNBase, scheme: str, gain: float, distribution: str, mode: str, generator: torch.Generator | None
) -> None:
    for name, param in module.named_parameters(recurse=False):
        if not name.startswith("weight"):
            continue
        gates = max(1, param.shape[0] // module.hidden_size) if not name.startswith("weight_hr") else 1
        for chunk in param.chunk(gates, dim=0):
            if name.startswith("weight_hh"):
                nn.init.orthogonal_(chunk, generator=generator)
            else:
                fans = (float(chunk.shape[1]), float(chunk.shape[0]))
                _init_matrix_(chunk, scheme, fans, gain, distribution, mode, generator)


def zero_init_residual_(model: nn.Module, traces: dict[str, LayerTrace]) -> list[str]:
    """Zero the weight (γ) of the last norm in each residual branch, so every residual block starts as identity.

    Goyal et al. 2017 ("Accurate, Large Minibatch SGD"); the branches come from the trace
    (``LayerTrace.residual_norm``). A frozen norm (``requires_grad=False``: a pretrained backbone) is left as it is.
    Returns the qualified names of the norms zeroed.

    Example::

        >>> from lightning_bn.tracing import trace_activations
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
        ...     def forward(self, x):
        ...         return torch.relu(x + self.bn(self.fc(x)))
        >>> block = Block()
        >>> zero_init_residual_(block, trace_activations(block, torch.randn(4, 8)))
        ['bn']
    """
    modules = dict(model.named_modules())
    zeroed = list(dict.fromkeys(t.residual_norm for t in traces.values() if t.residual_norm is not None))
    zeroed = [n for n in zeroed if isinstance(w := getattr(modules[n], "weight", None), Tensor) and w.requires_grad]
    with torch.no_grad():
        for name in zeroed:
            local_tensor(modules[name].weight).zero_()
    return zeroed
