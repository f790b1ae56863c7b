"""The layer registry: which modules are layers, where their weights are, their fans and their output layout.

Like the activation and norm registries, one place answers for every part of the library: the trace follows the
output of every registered layer, the initializers draw every weight it lists with its fans, and the monitors count
units along its layout. Built in: ``Linear``, ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``, ``Embedding``,
``RNN``/``LSTM``/``GRU``, ``nn.MultiheadAttention`` (its packed ``in_proj_weight`` and its ``out_proj``) and
transformers' ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``), recognized by name so transformers is
never imported, and timm's weight-standardized convolutions (``StdConv2d``, ``ScaledStdConv2d``, their 1d and ``Same``
variants: NF-Nets, BiT), also by name. :func:`register_layer` adds a kind.

The registry also says how each weight acts (:class:`WeightSpec`): the *effective* weight forward uses, which parameter
an init draws, which parameter a data-driven rescale multiplies (the weight itself, a gain, a weight norm's ``g``) or
why nothing can set its scale. On top of every kind, a reparametrized weight is recognized generically: weight norm
(``torch.nn.utils.parametrizations.weight_norm``: ``g``, ``v``; the legacy ``torch.nn.utils.weight_norm`` hook:
``weight_g``, ``weight_v``) is drawn into ``v`` with ``g`` set so the effective weight equals the draw; spectral norm,
an orthogonal parametrization or any other parametrization, and a weight that is no parameter, fix the scale (reason
in :attr:`WeightSpec.fixed`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "LayerKind",
    "WeightSpec",
    "available_layers",
    "effective_weights",
    "fixed_scale",
    "get_layer_kind",
    "layer_fans",
    "register_layer",
    "scheme_std",
    "sync_weights",
]


def _resolve(module: nn.Module, path: str) -> Tensor:
    owner = module
    *parts, last = path.split(".")
    for part in parts:
        owner = getattr(owner, part)
    return getattr(owner, last)


@dataclass(frozen=True)
class WeightSpec:
    """One weight of a layer that an initializer draws, and how it acts in forward.

    Attributes:
        name: attribute path of the parameter an init draws (``"weight"``, ``"in_proj_weight"``,
            ``"out_proj.weight"``; a weight-normalized layer's direction ``"parametrizations.weight.original1"``).
        fan_in: inputs feeding one output unit.
        fan_out: outputs fed by one input unit.
        chunks: the parameter packs this many matrices along its output dimension (q, k, v: 3), each drawn alone.
        transposed: stored ``(in, out)`` instead of ``(out, in)`` (transformers' ``Conv1D``).
        effective: the weight forward uses, computed from the module (``None``: the parameter ``name`` itself).
        scale: attribute path of the parameter that sets the effective weight's scale, broadcast against it (timm's
            ``ScaledStdConv2d.gain``, a weight norm's ``g``): an init draws ``name`` and sets ``scale`` so that the
            effective weight has the draw's norm along each of its entries; a rescale multiplies ``scale``.
        fixed: why nothing can set the effective weight's scale (weight standardized without a gain, spectral norm):
            then neither an init nor a rescale touches it, and ``prepare`` keeps the layer with this reason.
        form: the effective weight in words (``"plain"``, ``"weight norm"``, ``"weight standardized"``).
        sync: recompute what forward reads after a write (the legacy weight norm caches ``weight`` in a pre-hook).
    """

    name: str
    fan_in: float
    fan_out: float
    chunks: int = 1
    transposed: bool = False
    effective: Callable[[nn.Module], Tensor] | None = None
    scale: str | None = None
    fixed: str | None = None
    form: str = "plain"
    sync: Callable[[nn.Module], None] | None = None

    def tensor(self, module: nn.Module) -> Tensor:
        """The parameter an init draws."""
        return _resolve(module, self.name)

    def effective_weight(self, module: nn.Module) -> Tensor:
        """The weight forward uses."""
        return self.effective(module) if self.effective is not None else self.tensor(module)

    def scale_tensor(self, module: nn.Module) -> Tensor | None:
        """The parameter that sets the effective weight's scale, if it is not the weight itself."""
        return None if self.scale is None else _resolve(module, self.scale)

    def scaled(self, module: nn.Module) -> list[Tensor]:
        """What a rescale of the layer's output multiplies: the scale parameter, the weight, or nothing (fixed)."""
        if self.fixed is not None:
            return []
        return [self.scale_tensor(module) if self.scale is not None else self.tensor(module)]


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

    ``weights`` describes the layer as its class defines it; calling ``kind.weights(module)`` returns the specs as the
    module holds them: a weight reparametrized by ``torch.nn.utils.parametrize`` or a legacy weight-norm / spectral-norm
    hook is recognized on top of any kind (weight norm: drawn into ``v``, ``g`` matched; anything else: ``fixed``).
    """

    name: str
    weights: Callable[[nn.Module], list[WeightSpec]]
    types: tuple[type[nn.Module], ...] = ()
    channels: Literal["first", "last"] = "last"
    matches: Callable[[nn.Module], bool] | None = None
    recurrent: bool = False
    bias_names: tuple[str, ...] = field(default=("bias",))

    def __post_init__(self) -> None:
        if not isinstance(self.weights, _AsHeld):
            object.__setattr__(self, "weights", _AsHeld(self.weights, self.recurrent))

    def covers(self, module: nn.Module) -> bool:
        return isinstance(module, self.types) or (self.matches is not None and self.matches(module))


class _AsHeld:
    """A kind's weight description with the module's reparametrizations applied (see :class:`LayerKind`)."""

    def __init__(self, describe: Callable[[nn.Module], list[WeightSpec]], recurrent: bool) -> None:
        self.describe, self.recurrent = describe, recurrent

    def __call__(self, module: nn.Module) -> list[WeightSpec]:
        specs = [_as_held(spec, module) for spec in self.describe(module)]
        if self.recurrent and _reparametrized(module):
            why = "a recurrent layer with a reparametrized weight (weight norm, spectral norm, ...): not supported"
            specs = [replace(s, fixed=why) if s.fixed is None else s for s in specs]
        return specs


def _reparametrized(module: nn.Module) -> bool:
    hooked = any(type(h).__name__ in ("WeightNorm", "SpectralNorm") for h in module._forward_pre_hooks.values())
    return hooked or parametrize.is_parametrized(module)


_PARAMETRIZATIONS = {
    "_SpectralNorm": "spectral norm: the parametrization divides the weight by its largest singular value, so its "
    "scale cannot be set",
    "_Orthogonal": "orthogonal parametrization: the weight's singular values are 1, so its scale cannot be set",
}


def _as_held(spec: WeightSpec, module: nn.Module) -> WeightSpec:
    """``spec`` (written for the plain layer) as ``module`` holds the weight: parametrized, hooked, or a parameter."""
    *path, last = spec.name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    prefix = "".join(f"{part}." for part in path)
    effective = spec.effective or functools.partial(_resolve, path=spec.name)
    if parametrize.is_parametrized(owner, last):
        chain = owner.parametrizations[last]
        names = [type(p).__name__ for p in chain]
        stored = f"{prefix}parametrizations.{last}.original"
        if names == ["_WeightNorm"]:
            return replace(spec, name=f"{stored}1", scale=f"{stored}0", effective=effective,
                           form="weight norm (g = original0, v = original1)")  # fmt: skip
        why = next((_PARAMETRIZATIONS[n] for n in names if n in _PARAMETRIZATIONS), None)
        why = why or f"parametrized weight ({', '.join(names)}): how its parameters set the weight is unknown"
        held = stored if hasattr(chain, "original") else f"{stored}0"
        return replace(spec, name=held, effective=effective, fixed=why, form=f"parametrized ({', '.join(names)})")
    for hook in owner._forward_pre_hooks.values():
        if getattr(hook, "name", None) != last:
            continue
        if type(hook).__name__ == "WeightNorm" and callable(getattr(hook, "compute_weight", None)):

            def computed(m: nn.Module, hook: Callable = hook, path: tuple = tuple(path)) -> Tensor:
                return hook.compute_weight(_owner(m, path))

            def sync(m: nn.Module, hook: Callable = hook, path: tuple = tuple(path)) -> None:
                hook(_owner(m, path), ())  # what the pre-forward hook does: ``weight`` recomputed from g and v

            return replace(spec, name=f"{prefix}{last}_v", scale=f"{prefix}{last}_g", effective=computed, sync=sync,
                           form=f"weight norm (legacy hook: {last}_g, {last}_v)")  # fmt: skip
        if type(hook).__name__ == "SpectralNorm":
            why = _PARAMETRIZATIONS["_SpectralNorm"].replace("the parametrization", "the legacy hook")
            return replace(spec, name=f"{prefix}{last}_orig", fixed=why, form="spectral norm (legacy hook)")
    if spec.fixed is None and not isinstance(spec.tensor(module), nn.Parameter):
        why = "its weight is no parameter (computed in forward, or a buffer): there is nothing to draw"
        return replace(spec, fixed=why, form="computed")
    return spec


def _owner(module: nn.Module, path: tuple) -> nn.Module:
    for part in path:
        module = getattr(module, part)
    return module


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

    Say how the weight acts when forward does not use it as it is stored. A layer that normalizes each row of its
    weight and multiplies it by a learned per-row ``gain``: the init draws ``weight`` and sets ``gain`` so the
    effective weight has the draw's scale, and a rescale multiplies ``gain`` (scaling ``weight`` would change
    nothing). Without a gain, say why nothing can set the scale: ``WeightSpec(..., fixed="rows normalized")``, and
    ``prepare`` keeps the layer with that reason::

        >>> class RowNormLinear(nn.Linear):
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__(n_in, n_out)
        ...         self.gain = nn.Parameter(torch.ones(n_out, 1))
        ...     def effective(self):
        ...         return self.gain * nn.functional.normalize(self.weight, dim=1)
        ...     def forward(self, x):
        ...         return nn.functional.linear(x, self.effective(), self.bias)
        >>> def row_norm(m):
        ...     return [WeightSpec("weight", m.in_features, m.out_features, effective=lambda m: m.effective(),
        ...                        scale="gain", form="rows normalized, scaled by gain")]
        >>> _ = register_layer(LayerKind("row_norm_demo", row_norm, types=(RowNormLinear,)), overwrite=True)
        >>> get_layer_kind(RowNormLinear(4, 2)).weights(RowNormLinear(4, 2))[0].scale
        'gain'
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


def fixed_scale(module: nn.Module) -> str | None:
    """Why nothing can set the scale of the weights forward uses (every weight ``fixed``), or ``None``.

    Example::

        >>> from torch.nn.utils.parametrizations import spectral_norm
        >>> fixed_scale(spectral_norm(nn.Linear(4, 4))).split(":")[0], fixed_scale(nn.Linear(4, 4))
        ('spectral norm', None)
    """
    kind = get_layer_kind(module)
    specs = kind.weights(module) if kind is not None else []
    if not specs or any(s.fixed is None for s in specs):
        return None
    return "; ".join(dict.fromkeys(s.fixed for s in specs))


def effective_weights(module: nn.Module) -> list[Tensor]:
    """The weights forward uses, one per :class:`WeightSpec` of the layer (computed where it is reparametrized).

    Example::

        >>> import torch
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> layer = weight_norm(nn.Linear(4, 2))
        >>> torch.allclose(effective_weights(layer)[0], layer.weight)
        True
    """
    kind = get_layer_kind(module)
    return [] if kind is None else [s.effective_weight(module) for s in kind.weights(module)]


def sync_weights(module: nn.Module) -> None:
    """Recompute what forward reads from parameters that were written (the legacy weight norm's cached ``weight``)."""
    kind = get_layer_kind(module)
    for spec in [] if kind is None else kind.weights(module):
        if spec.sync is not None:
            spec.sync(module)


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


#: timm's weight-standardized convolutions (``timm.layers.std_conv``), recognized by class name (any in the MRO).
STD_CONV_NAMES = frozenset(
    f"{scaled}StdConv{d}d{same}" for scaled in ("", "Scaled") for d in (1, 2) for same in ("", "Same")
)


def _is_std_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and any(c.__name__ in STD_CONV_NAMES for c in type(m).__mro__)


def _standardized(m: nn.Module) -> Tensor:
    """timm's forward: each output channel's weight standardized (``(w - mean) / sqrt(var + eps)``), times
    ``gain * scale`` where there is a gain (``ScaledStdConv2d``)."""
    get_weight = getattr(m, "get_weight", None)
    if callable(get_weight):
        return get_weight()
    w, gain = m.weight, getattr(m, "gain", None)
    affine = None if gain is None else (gain * getattr(m, "scale", 1.0)).reshape(-1)
    eps = getattr(m, "eps", 1e-6)
    flat = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=affine, training=True, momentum=0.0, eps=eps)
    return flat.reshape_as(w)


def _std_conv(m: nn.Module) -> list[WeightSpec]:
    (spec,) = _conv(m)
    if isinstance(getattr(m, "gain", None), nn.Parameter):
        return [replace(spec, effective=_standardized, scale="gain", form="weight standardized, scaled by gain")]
    why = "weight standardized: its scale cannot change the output"
    return [replace(spec, effective=_standardized, fixed=why, form="weight standardized")]


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
    LayerKind("std_conv", _std_conv, channels="first", matches=_is_std_conv),
):
    register_layer(_kind)
