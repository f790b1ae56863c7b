"""Detect the activation that follows each layer (one traced forward pass) and initialize layers to match it.

:func:`trace_activations` runs the model once on an example input under a :class:`~torch.overrides.TorchFunctionMode`
and forward hooks, and finds for every Linear / Conv / ConvTranspose / Embedding / RNN layer the first nonlinearity
that consumes its output, looking through normalization, dropout, reshapes, pooling and residual additions.
:func:`init_layer_`, :func:`lsuv_` and :func:`zero_init_residual_` initialize in place (timm style).

References: Glorot & Bengio (AISTATS 2010); He et al. (ICCV 2015); Klambauer et al. (NeurIPS 2017, LeCun init for
SELU); Saxe et al. (ICLR 2014, orthogonal init); Mishkin & Matas (ICLR 2016, LSUV).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from lightning_bn.activations import Activation, activation_of_call, activation_of_module, get_activation

__all__ = [
    "LAYER_TYPES",
    "SCHEMES",
    "LayerTrace",
    "as_call",
    "init_layer_",
    "layer_fans",
    "lsuv_",
    "output_stds",
    "rescale_to_unit_variance_",
    "trace_activations",
    "zero_init_residual_",
]

#: Layers that get initialized: their output is what detection follows to the next nonlinearity.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.RNNBase)
#: Initialization schemes understood by :func:`init_layer_`.
SCHEMES = ("xavier", "kaiming", "lecun", "orthogonal", "numeric")

Scheme = Literal["xavier", "kaiming", "lecun", "orthogonal", "numeric"]
Distribution = Literal["normal", "uniform", "truncated_normal"]
FanMode = Literal["fan_in", "fan_out"]

_NORM_TYPES = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)
_PASS_TYPES = (
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
# Canonical names (lower case, no underscores) of shape-preserving calls looked through, and aliases.
_LOOK_THROUGH = frozenset(
    "view reshape flatten unflatten permute transpose t contiguous squeeze unsqueeze expand expandas viewas "
    "reshapeas getitem narrow chunk split unbind clone detach to float double half bfloat16 typeas cat stack pad "
    "movedim swapaxes swapdims repeat roll flip interpolate upsample mean add sub neg dropout dropout1d dropout2d "
    "dropout3d alphadropout featurealphadropout batchnorm layernorm groupnorm instancenorm rmsnorm "
    "localresponsenorm".split()
)
_ALIASES = {"iadd": "add", "radd": "add", "isub": "sub", "rsub": "sub", "imul": "mul", "rmul": "mul"}
_ALIASES |= {"truediv": "div", "itruediv": "div", "idiv": "div", "concat": "cat", "concatenate": "cat"}
_SCALE_OPS = frozenset({"mul", "div"})
_TRUNC_STD = 0.8796256610342398  # std of N(0, 1) truncated to [-2, 2]


@dataclass
class LayerTrace:
    """What one layer's output meets on its way through ``forward``.

    Attributes:
        name: qualified module name.
        module: the layer.
        activation: the first nonlinearity consuming the output (identity for logits and for outputs consumed by
            no nonlinearity).
        how: ``"module"`` (an activation module), ``"function"`` (``F.silu``, ``torch.tanh``), ``"method"``
            (``x.relu()``), ``"output"`` (reaches the model output without one) or ``"none"`` (consumed by
            something else, e.g. another layer).
        output_shape: shape of the layer's output on the example input (first call).
        through: shape-preserving steps looked through on the way, e.g. ``["BatchNorm1d", "Dropout", "add"]``.
        consumer: qualified name of the activation module, when found as a module.
        norm_after: qualified name of the first norm module consuming the output (through reshapes/dropout).
        residual_norm: the last norm module on this layer's path into a residual addition, when the layer is on the
            deeper operand (the residual branch): the norm :func:`zero_init_residual_` zeroes.
        output_std: standard deviation of the layer's output on the example input (first call).
    """

    name: str
    module: nn.Module
    activation: Activation
    how: str
    output_shape: tuple[int, ...]
    through: list[str] = field(default_factory=list)
    consumer: str | None = None
    norm_after: str | None = None
    residual_norm: str | None = None
    output_std: float = math.nan


@dataclass(frozen=True)
class _Path:
    through: tuple[str, ...] = ()
    first_norm: str | None = None
    last_norm: str | None = None

    def step(self, what: str, norm: str | None = None) -> _Path:
        return _Path(self.through + (what,), self.first_norm or norm, norm or self.last_norm)


def _canonical(func: Any) -> str:
    name = getattr(func, "__name__", "").strip("_").replace("_", "").lower()
    return _ALIASES.get(name, name)


def _is_method(func: Any) -> bool:
    return getattr(torch.Tensor, getattr(func, "__name__", ""), None) is func


def _tensors(obj: Any) -> list[Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]


def as_call(model: nn.Module, example_input: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from a Tensor, a tuple of args or a dict of kwargs.

    Tensors are moved to the device of the model's first parameter.
    """
    param = next(model.parameters(), None)
    if param is not None:
        example_input = tree_map(lambda t: t.to(param.device) if isinstance(t, Tensor) else t, example_input)
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, running statistics untouched) under ``no_grad``; restores every module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _run(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    try:
        return model(*args, **kwargs)
    except _StopForward:
        raise
    except Exception as err:
        raise ValueError(
            f"Expected the example input to run through {type(model).__name__}.forward, but it raised "
            f"{type(err).__name__}: {err}"
        ) from err


class _Tracer:
    """Bookkeeping of one traced forward pass: which layers each live tensor came from, and how deep it is."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.info: dict[int, tuple[weakref.ref, dict[str, _Path], int]] = {}
        self.layers: dict[str, LayerTrace] = {}
        self.found: dict[str, tuple[Activation, str, _Path, str | None]] = {}
        self.norm_after: dict[str, str] = {}
        self.residual_norm: dict[str, str] = {}
        self.opaque = 0

    def get(self, t: Tensor) -> tuple[dict[str, _Path], int]:
        entry = self.info.get(id(t))
        if entry is None or entry[0]() is not t:
            return {}, 0
        return entry[1], entry[2]

    def put(self, outputs: Any, tags: dict[str, _Path], depth: int) -> None:
        for t in _tensors(outputs):
            self.info[id(t)] = (weakref.ref(t), tags, depth)

    def gather(self, inputs: Any) -> tuple[list[tuple[dict[str, _Path], int, Tensor]], dict[str, _Path], int]:
        seen = [(*self.get(t), t) for t in _tensors(inputs)]
        merged: dict[str, _Path] = {}
        for tags, _, _ in seen:
            for producer, path in tags.items():
                merged.setdefault(producer, path)
        return seen, merged, max((d for _, d, _ in seen), default=0)

    def resolve(self, tags: dict[str, _Path], act: Activation, how: str, consumer: str | None = None) -> None:
        for producer, path in tags.items():
            self.found.setdefault(producer, (act, how, path, consumer))

    # ---- module hooks ----
    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        act = activation_of_module(module)
        if act is not None and not act.is_identity:
            _, tags, _ = self.gather((args, kwargs))
            self.resolve(tags, act, "module", self.names[module])
        self.opaque += 1

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.opaque -= 1
        name = self.names[module]
        _, tags, depth = self.gather((args, kwargs))
        if isinstance(module, LAYER_TYPES):
            main = output[0] if isinstance(output, tuple) else output
            if name not in self.layers and isinstance(main, Tensor):
                self.opaque += 1  # the measurement is no step of the model
                std = main.float().std().item()
                self.opaque -= 1
                self.layers[name] = LayerTrace(name, module, get_activation(None), "none", tuple(main.shape))
                self.layers[name].output_std = std
            self.put(output, {}, depth + 1)
            if isinstance(main, Tensor):
                self.put(main, {name: _Path()}, depth + 1)
        elif isinstance(module, _NORM_TYPES):
            for producer, path in tags.items():
                if path.first_norm is None:
                    self.norm_after.setdefault(producer, name)
            self.put(output, {p: path.step(type(module).__name__, name) for p, path in tags.items()}, depth)
        elif isinstance(module, _PASS_TYPES):
            self.put(output, {p: path.step(type(module).__name__) for p, path in tags.items()}, depth)
        else:  # an activation module: its output carries no layer's tag
            self.put(output, {}, depth)

    # ---- every torch function call outside the hooked modules ----
    def call(self, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seen, tags, depth = self.gather((args, kwargs))
        if not tags:
            self.put(output, {}, depth)
            return
        act = activation_of_call(func, args, kwargs)
        if act is not None and not act.is_identity:
            self.resolve(tags, act, "method" if _is_method(func) else "function")
            self.put(output, {}, depth)
            return
        name = _canonical(func)
        big = [t for t in seen if t[2].numel() > 1]
        if name in _SCALE_OPS and len(big) == 1:
            self.put(output, {p: path.step(name) for p, path in tags.items()}, depth)
        elif name in _LOOK_THROUGH:
            if name in ("add", "sub") and len(big) >= 2 and len({tuple(t.shape) for *_, t in big}) == 1:
                self._note_residual(big)
            self.put(output, {p: path.step(name) for p, path in tags.items()}, depth)
        else:
            self.put(output, {}, depth)

    def _note_residual(self, operands: list[tuple[dict[str, _Path], int, Tensor]]) -> None:
        deepest = max(d for _, d, _ in operands)
        if all(d == deepest for _, d, _ in operands):
            return  # no shallower shortcut: not recognizably a residual connection
        for tags, d, _ in operands:
            if d == deepest:
                for producer, path in tags.items():
                    if path.last_norm is not None:
                        self.residual_norm.setdefault(producer, path.last_norm)

    def finish(self, output: Any) -> dict[str, LayerTrace]:
        for t in _tensors(output):
            tags, _ = self.get(t)
            self.resolve(tags, get_activation(None), "output")
        for name, trace in self.layers.items():
            if name in self.found:
                act, how, path, consumer = self.found[name]
                trace.activation, trace.how, trace.through, trace.consumer = act, how, list(path.through), consumer
            trace.norm_after = self.norm_after.get(name)
            trace.residual_norm = self.residual_norm.get(name)
        self.info.clear()
        return self.layers


class _TraceMode(TorchFunctionMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if not self.tracer.opaque:
            self.tracer.call(func, args, kwargs, output)
        return output


def _hooked_modules(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        act = activation_of_module(module)
        if isinstance(module, LAYER_TYPES + _NORM_TYPES + _PASS_TYPES) or (act is not None and not act.is_identity):
            yield module


def trace_activations(model: nn.Module, example_input: Any) -> dict[str, LayerTrace]:
    """Run ``model`` once on ``example_input`` and find the nonlinearity that consumes each layer's output.

    Activation modules are seen by forward pre-hooks; functional calls (``F.gelu``), torch functions
    (``torch.tanh``) and tensor methods (``x.relu()``) by a ``TorchFunctionMode``, all asked of the registry
    (:func:`~lightning_bn.activations.activation_of_call`). Each layer's output is followed through norms, dropout,
    pooling, reshapes, scaling by a constant and additions; the first registered activation it meets wins. The
    pass runs in eval mode under ``no_grad`` (no dropout, running statistics untouched) and restores every
    module's train/eval mode. No tensor is kept after it.

    Args:
        model: any ``nn.Module``; ``forward`` may have Python control flow and nested modules.
        example_input: a Tensor, a tuple of positional args, or a dict of keyword args.

    Returns:
        ``{qualified name: LayerTrace}`` for every layer of :data:`LAYER_TYPES` that ran, in execution order.

    Raises:
        ValueError: if ``forward`` raises on the example input; the message names the exception.

    Example::

        >>> import torch.nn.functional as F
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.bn, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.out(F.silu(self.bn(self.fc(x))))
        >>> traces = trace_activations(Net(), torch.randn(3, 4))
        >>> [(t.name, t.activation.name, t.how, t.through) for t in traces.values()]
        [('fc', 'silu', 'function', ['BatchNorm1d']), ('out', 'identity', 'output', [])]
    """
    args, kwargs = as_call(model, example_input)
    tracer = _Tracer(model)
    handles = []
    for module in _hooked_modules(model):
        handles.append(module.register_forward_pre_hook(tracer.enter, with_kwargs=True))
        handles.append(module.register_forward_hook(tracer.leave, with_kwargs=True))
    try:
        with _measuring(model), _TraceMode(tracer):
            output = _run(model, args, kwargs)
        return tracer.finish(output)
    finally:
        for handle in handles:
            handle.remove()
        tracer.info.clear()


# ---- initializers ------------------------------------------------------------------------------------------------


def layer_fans(module: nn.Module) -> tuple[float, float]:
    """``(fan_in, fan_out)`` of a layer: inputs feeding one output unit and outputs fed by one input unit.

    A lookup in an Embedding reads one row, so both fans are 1; a transposed convolution's fan-in is divided by its
    stride (taps that hit one output on average).

    Example::

        >>> layer_fans(nn.Conv2d(3, 16, 3))
        (27.0, 144.0)
    """
    if isinstance(module, nn.Embedding):
        return 1.0, 1.0
    weight = module.weight
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        taps = math.prod(module.kernel_size) / math.prod(module.stride)
        return max(1.0, weight.shape[0] // module.groups * taps), float(weight.shape[1] * math.prod(module.kernel_size))
    receptive = math.prod(weight.shape[2:])
    groups = getattr(module, "groups", 1)
    return float(weight.shape[1] * receptive), float(weight.shape[0] // groups * receptive)


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
    fan_in, fan_out = fans
    if scheme == "xavier":
        variance = gain**2 * 2.0 / (fan_in + fan_out)
    else:
        variance = gain**2 / (fan_in if mode == "fan_in" else fan_out)
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
) -> float:
    """Initialize one layer's weights in place for the activation that follows it; biases to zero.

    Weights get zero mean and variance ``v``:

    - ``"xavier"`` (Glorot & Bengio 2010): ``v = g² · 2 / (fan_in + fan_out)``;
    - ``"kaiming"`` (He et al. 2015) and ``"numeric"``: ``v = g² / fan`` (``fan`` per ``mode``);
    - ``"lecun"``: ``v = 1 / fan`` (the self-normalizing init for SELU), ``g`` only if given explicitly;
    - ``"orthogonal"`` (Saxe et al. 2014): a random orthogonal matrix scaled to ``v = g² / fan``.

    ``g`` is ``gain`` if given, else ``activation.gain`` = ``1 / sqrt(E[f(z)²])``, ``z ~ N(0, 1)``, by quadrature
    (√2 for ReLU as in ``torch.nn.init.calculate_gain``; ≈ 1.59 for tanh where PyTorch uses 5/3, and ≈ 1.0 for SELU
    where PyTorch uses 3/4: the numeric value is the one that keeps ``E[f(z)²]`` at the unit fixed point), else 1.
    Embeddings take ``fan_in = fan_out = 1`` (a lookup reads one row). RNN layers get the scheme on each gate's
    input weights with the gain of their own ``nonlinearity``, orthogonal recurrent weights (gain 1).

    Args:
        module: a layer of :data:`LAYER_TYPES`.
        scheme: one of :data:`SCHEMES`.
        activation: the activation consuming the layer's output (``None``: identity).
        distribution: ``"normal"``, ``"uniform"`` or ``"truncated_normal"`` (truncated at ±2σ, rescaled so the
            variance is still ``v``).
        mode: ``"fan_in"`` (preserve forward variance) or ``"fan_out"`` (backward).
        gain: overrides the activation's gain.
        generator: random generator on the weights' device (``None``: the global one).

    Returns:
        the gain used.

    Raises:
        ValueError: for an unknown scheme, distribution or mode.
        TypeError: for a module that is not a layer of :data:`LAYER_TYPES`.

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
    if not isinstance(module, LAYER_TYPES):
        raise TypeError(f"Expected a Linear, Conv, Embedding or RNN layer but got {type(module).__name__}")
    if isinstance(module, nn.RNNBase):
        activation = get_activation(getattr(module, "nonlinearity", None))
    if gain is None:
        gain = 1.0 if scheme == "lecun" or activation is None else activation.gain
    with torch.no_grad():
        if isinstance(module, nn.RNNBase):
            _init_rnn_(module, scheme, gain, distribution, mode, generator)
        else:
            _init_matrix_(module.weight, scheme, layer_fans(module), gain, distribution, mode, generator)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        for name, param in module.named_parameters(recurse=False):
            if name.startswith("bias"):
                param.zero_()
    return gain


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


class _StopForward(Exception):
    """Raised by a measuring hook once the watched layer has run: the rest of the forward pass is not needed."""


def output_stds(model: nn.Module, example_input: Any, names: Sequence[str]) -> dict[str, float]:
    """Standard deviation of each named module's output (first call) on ``example_input``, in eval mode."""
    args, kwargs = as_call(model, example_input)
    modules = dict(model.named_modules())
    stds: dict[str, float] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            main = output[0] if isinstance(output, tuple) else output
            if name not in stds and isinstance(main, Tensor):
                stds[name] = main.detach().float().std().item()

        return record

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        with _measuring(model):
            _run(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stds


def _output_variance(model: nn.Module, layer: nn.Module, args: tuple, kwargs: dict) -> float:
    found: list[float] = []

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        found.append(output.detach().float().var().item())
        raise _StopForward

    handle = layer.register_forward_hook(record)
    try:
        with contextlib.suppress(_StopForward):
            _run(model, args, kwargs)
    finally:
        handle.remove()
    return found[0] if found else float("nan")


def rescale_to_unit_variance_(
    model: nn.Module, example_input: Any, names: Sequence[str], tol: float = 0.1, max_iters: int = 10
) -> dict[str, float]:
    """Rescale each named layer's weight, in the given (forward) order, until its output variance is 1 ± ``tol``.

    The data-driven half of LSUV (Mishkin & Matas 2016). A layer whose output variance is 0 or not finite is left
    as it is. Returns the final output variance of each layer.
    """
    args, kwargs = as_call(model, example_input)
    modules = dict(model.named_modules())
    variances: dict[str, float] = {}
    with _measuring(model):
        for name in names:
            layer = modules[name]
            variance = _output_variance(model, layer, args, kwargs)
            for _ in range(max_iters):
                if not math.isfinite(variance) or variance <= 0 or abs(variance - 1.0) <= tol:
                    break
                layer.weight.mul_(variance**-0.5)
                variance = _output_variance(model, layer, args, kwargs)
            variances[name] = variance
    return variances


def lsuv_(
    model: nn.Module,
    example_input: Any,
    layers: Sequence[str] | None = None,
    tol: float = 0.1,
    max_iters: int = 10,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Layer-sequential unit-variance init (Mishkin & Matas, ICLR 2016), in place.

    Each layer gets an orthogonal weight (gain 1) and a zero bias, then, in forward order, its weight is rescaled
    until its output variance on ``example_input`` is 1 within ``tol`` (at most ``max_iters`` passes each). Works with
    norm layers and residual connections; recurrent layers are left out (their output is not linear in the scale).

    Args:
        model: the model.
        example_input: a Tensor, tuple of args or dict of kwargs; a batch large enough for a stable variance.
        layers: qualified names to initialize (default: every traced layer but RNNs).
        tol: tolerance on the output variance.
        max_iters: rescaling passes per layer.
        generator: random generator for the orthogonal matrices.

    Returns:
        ``{name: output variance}`` after the rescaling.

    Raises:
        ValueError: if the example input fails in ``forward`` or a name in ``layers`` is no traced layer.

    Example::

        >>> net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
        >>> variances = lsuv_(net, torch.randn(256, 16))
        >>> all(abs(v - 1) <= 0.1 for v in variances.values())
        True
    """
    traces = trace_activations(model, example_input)
    eligible = [n for n, t in traces.items() if not isinstance(t.module, nn.RNNBase)]
    if layers is not None:
        unknown = [n for n in layers if n not in eligible]
        if unknown:
            raise ValueError(f"Expected `layers` to name traced Linear/Conv/Embedding layers but got {unknown}")
        eligible = [n for n in eligible if n in set(layers)]
    for name in eligible:
        init_layer_(traces[name].module, "orthogonal", gain=1.0, generator=generator)
    return rescale_to_unit_variance_(model, example_input, eligible, tol=tol, max_iters=max_iters)


def zero_init_residual_(model: nn.Module, traces: dict[str, LayerTrace]) -> list[str]:
    """Zero the weight (γ) of the last norm in each residual branch, so every residual block starts as identity.

    Goyal et al. 2017 ("Accurate, Large Minibatch SGD"); the branches come from :func:`trace_activations`
    (``LayerTrace.residual_norm``). Returns the qualified names of the norms zeroed.

    Example::

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
    with torch.no_grad():
        for name in zeroed:
            weight = getattr(modules[name], "weight", None)
            if isinstance(weight, Tensor):
                weight.zero_()
    return [n for n in zeroed if isinstance(getattr(modules[n], "weight", None), Tensor)]
