"""The layer registry: which modules are layers, where their weights are, their fans and their output layout.

Like the activation and norm registries, one place answers for every part of the library: the trace follows the
output of every registered layer, the initializers draw every weight it lists with its fans, and the monitors count
units along its layout. Built in: ``Linear``, ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``, ``Embedding``,
``RNN``/``LSTM``/``GRU``, ``nn.MultiheadAttention`` (its packed ``in_proj_weight`` and its ``out_proj``) and
transformers' ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``), recognized by name so transformers is
never imported. :func:`register_layer` adds a kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

__all__ = [
    "LayerKind",
    "WeightSpec",
    "available_layers",
    "get_layer_kind",
    "layer_fans",
    "register_layer",
    "scheme_std",
]


@dataclass(frozen=True)
class WeightSpec:
    """One weight of a layer that an initializer draws.

    Attributes:
        name: attribute path of the parameter on the layer (``"weight"``, ``"in_proj_weight"``, ``"out_proj.weight"``).
        fan_in: inputs feeding one output unit.
        fan_out: outputs fed by one input unit.
        chunks: the parameter packs this many matrices along its output dimension (q, k, v: 3), each drawn alone.
        transposed: stored ``(in, out)`` instead of ``(out, in)`` (transformers' ``Conv1D``).
    """

    name: str
    fan_in: float
    fan_out: float
    chunks: int = 1
    transposed: bool = False

    def tensor(self, module: nn.Module) -> Tensor:
        owner = module
        *path, last = self.name.split(".")
        for part in path:
            owner = getattr(owner, part)
        return getattr(owner, last)


@dataclass(frozen=True)
class LayerKind:
    """A kind of layer.

    Args:
        name: canonical name (``"linear"``).
        types: module classes of the kind (subclasses included).
        weights: the weights to draw, with their fans.
        channels: where the output's units are: ``"last"`` (``(N, C)``, ``(N, T, C)``) or ``"first"`` (dim 1 of
            ``(N, C, *spatial)``).
        matches: an extra test for modules of no listed class (e.g. by class name, to avoid an import).
        recurrent: RNN-like: gates are drawn one by one with the layer's own nonlinearity, recurrent weights
            orthogonal.
    """

    name: str
    weights: Callable[[nn.Module], list[WeightSpec]]
    types: tuple[type[nn.Module], ...] = ()
    channels: Literal["first", "last"] = "last"
    matches: Callable[[nn.Module], bool] | None = None
    recurrent: bool = False
    bias_names: tuple[str, ...] = field(default=("bias",))

    def covers(self, module: nn.Module) -> bool:
        return isinstance(module, self.types) or (self.matches is not None and self.matches(module))


_REGISTRY: dict[str, LayerKind] = {}


def register_layer(kind: LayerKind, *, overwrite: bool = False) -> LayerKind:
    """Add a layer kind: the trace follows its output, ``prepare`` initializes its weights.

    Raises:
        ValueError: if the name is taken and ``overwrite`` is False.

    Example::

        >>> class Scale(nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(n, n))
        ...     def forward(self, x):
        ...         return x @ self.weight.T
        >>> import torch
        >>> _ = register_layer(LayerKind("scale_demo", lambda m: [WeightSpec("weight", m.weight.shape[1],
        ...     m.weight.shape[0])], types=(Scale,)), overwrite=True)
        >>> get_layer_kind(Scale(4)).name
        'scale_demo'
    """
    if kind.name in _REGISTRY and not overwrite:
        raise ValueError(f"Expected a new layer kind name but got {kind.name!r}, which is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def available_layers() -> list[str]:
    """Names of every registered layer kind."""
    return sorted(_REGISTRY)


def get_layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``, or ``None`` if it is no registered layer (the last registered match wins)."""
    found = None
    for kind in _REGISTRY.values():
        if kind.covers(module):
            found = kind
    return found


def layer_fans(module: nn.Module) -> tuple[float, float]:
    """``(fan_in, fan_out)`` of a layer's (first) weight: the one fan function of the library.

    A lookup in an Embedding reads one row, so both fans are 1; a transposed convolution's fan-in is divided by its
    stride (taps that hit one output on average).

    Raises:
        TypeError: for a module that is no registered layer.

    Example::

        >>> layer_fans(nn.Conv2d(3, 16, 3)), layer_fans(nn.ConvTranspose2d(16, 8, 4, stride=2))
        ((27.0, 144.0), (64.0, 128.0))
    """
    kind = get_layer_kind(module)
    if kind is None:
        raise TypeError(f"Expected a registered layer ({available_layers()}) but got {type(module).__name__}")
    spec = kind.weights(module)[0]
    return spec.fan_in, spec.fan_out


def scheme_std(scheme: str, fan_in: float, fan_out: float, gain: float, mode: str = "fan_in") -> float:
    """The weight std an init scheme draws: Xavier ``g·√(2 / (fan_in + fan_out))``, else ``g / √fan`` (``fan`` per
    ``mode``): He, LeCun, orthogonal (rescaled to it) and the numeric gain. The one formula of the library.

    Example::

        >>> round(scheme_std("kaiming", 512, 512, 2**0.5), 4), round(scheme_std("xavier", 64, 256, 1.0), 4)
        (0.0625, 0.0791)
    """
    if scheme == "xavier":
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    return gain / math.sqrt(fan_in if mode == "fan_in" else fan_out)


# ---- built-in kinds ---------------------------------------------------------------------------------------------


def _linear(m: nn.Module) -> list[WeightSpec]:
    return [WeightSpec("weight", float(m.weight.shape[1]), float(m.weight.shape[0]))]


def _conv(m: nn.Module) -> list[WeightSpec]:
    w = m.weight
    receptive = math.prod(w.shape[2:])
    return [WeightSpec("weight", float(w.shape[1] * receptive), float(w.shape[0] // m.groups * receptive))]


def _conv_transpose(m: nn.Module) -> list[WeightSpec]:
    w = m.weight  # (in, out / groups, *kernel)
    taps = math.prod(m.kernel_size) / math.prod(m.stride)
    fan_in = max(1.0, w.shape[0] // m.groups * taps)
    return [WeightSpec("weight", fan_in, float(w.shape[1] * math.prod(m.kernel_size)))]


def _embedding(m: nn.Module) -> list[WeightSpec]:
    return [WeightSpec("weight", 1.0, 1.0)]


def _rnn(m: nn.Module) -> list[WeightSpec]:
    return [
        WeightSpec(name, float(p.shape[1]), float(p.shape[0]))
        for name, p in m.named_parameters(recurse=False)
        if name.startswith("weight")
    ]


def _attention(m: nn.MultiheadAttention) -> list[WeightSpec]:
    specs = []
    if m.in_proj_weight is not None:
        specs.append(WeightSpec("in_proj_weight", float(m.embed_dim), float(m.embed_dim), chunks=3))
    else:
        specs += [
            WeightSpec(n, float(getattr(m, n).shape[1]), float(getattr(m, n).shape[0]))
            for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        ]
    out = m.out_proj.weight
    return [*specs, WeightSpec("out_proj.weight", float(out.shape[1]), float(out.shape[0]))]


def _is_transformers_conv1d(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(m, "nf")


def _conv1d_transposed(m: nn.Module) -> list[WeightSpec]:
    return [WeightSpec("weight", float(m.weight.shape[0]), float(m.weight.shape[1]), transposed=True)]


for _kind in (
    LayerKind("linear", _linear, (nn.Linear,)),
    LayerKind("conv", _conv, (nn.modules.conv._ConvNd,), channels="first"),
    LayerKind("conv_transpose", _conv_transpose, (nn.modules.conv._ConvTransposeNd,), channels="first"),
    LayerKind("embedding", _embedding, (nn.Embedding,)),
    LayerKind("rnn", _rnn, (nn.RNNBase,), recurrent=True),
    LayerKind(
        "multihead_attention", _attention, (nn.MultiheadAttention,), bias_names=("in_proj_bias", "out_proj.bias")
    ),
    LayerKind("transformers_conv1d", _conv1d_transposed, matches=_is_transformers_conv1d),
):
    register_layer(_kind)
