"""What the trace knows before it runs: the module types it treats specially, the calls it looks through, and small
helpers on calls and layouts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_bn.layers import get_layer_kind
from lightning_bn.tracing.model_map import Layout

__all__ = ["LAYER_TYPES", "NORM_TYPES", "PASS_TYPES"]

#: Layers that get initialized: their output is what detection follows to the next nonlinearity.
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.RNNBase,
    nn.MultiheadAttention,
)  # the built-in classes of :mod:`lightning_bn.layers`; the trace asks the registry, which users can extend
#: Normalization layers: looked through, and remembered as the norm after a layer.
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
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
#: Shape-preserving or pooling modules looked through.
PASS_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_PLACEHOLDER_TYPES = (nn.modules.dropout._DropoutNd, nn.Identity)
# Canonical names (lower case, no underscores) of shape-preserving calls looked through, and aliases.
_LOOK_THROUGH = frozenset(
    "view reshape flatten unflatten permute transpose t contiguous squeeze unsqueeze expand expandas viewas "
    "reshapeas getitem narrow chunk split unbind clone detach to float double half bfloat16 typeas cat stack pad "
    "movedim swapaxes swapdims repeat roll flip interpolate upsample mean add sub neg dropout dropout1d dropout2d "
    "dropout3d alphadropout featurealphadropout batchnorm layernorm groupnorm instancenorm rmsnorm "
    "localresponsenorm".split()
)
_NORM_CALLS = frozenset("batchnorm layernorm groupnorm instancenorm rmsnorm localresponsenorm".split())
# calls whose output holds exactly the input's values at the same positions: the producing module's hook sees them
_SAME_VALUES = frozenset("contiguous clone detach to float double half bfloat16 typeas dropout".split())
_ALIASES = {"iadd": "add", "radd": "add", "isub": "sub", "rsub": "sub", "imul": "mul", "rmul": "mul"}
_ALIASES |= {"truediv": "div", "itruediv": "div", "idiv": "div", "concat": "cat", "concatenate": "cat"}
_SCALE_OPS = frozenset({"mul", "div"})
# element-wise calls: each output element depends only on the same element of each operand (and on scalars, or on
# constants broadcast along it); what the trace follows from a layer's output to find a composite activation
_ELEMENTWISE = frozenset(
    "add sub mul div neg pos abs exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square reciprocal sigmoid tanh sin "
    "cos tan atan asin acos sinh cosh asinh acosh atanh erf erfc erfinv sign sgn floor ceil round trunc frac clamp "
    "clip clampmin clampmax nantonum logsigmoid softplus softsign relu relu6 gelu silu mish elu selu celu leakyrelu "
    "hardtanh hardswish hardsigmoid hardshrink softshrink tanhshrink threshold logit pow rpow floatpower rdiv "
    "rtruediv maximum minimum fmax fmin where gt lt ge le eq ne greater less greaterequal lessequal logicalnot "
    "logicaland logicalor atan2 hypot copysign lerp xlogy sinc prelu contiguous clone detach to float double half "
    "bfloat16".split()
)
# element-wise calls affine in whatever operands they get (``mul`` and ``div`` are affine only with one operand that
# varies, and it divided): no nonlinearity on the way
_AFFINE = frozenset("add sub neg pos contiguous clone detach to float double half bfloat16".split())
# calls that keep values and only rearrange, broadcast, select or cast them: an activation's output stays one
# (a gate reshaped to broadcast, ``y.view(b, c, 1, 1)``, ``y.expand_as(x)``)
_REARRANGE = frozenset(
    "view reshape flatten unflatten permute transpose t contiguous squeeze unsqueeze expand expandas viewas "
    "reshapeas movedim swapaxes swapdims clone detach to float double half bfloat16 repeat getitem".split()
)
_SHAPE_FROM_SECOND = frozenset("expandas viewas reshapeas typeas".split())  # the second operand gives no values
_IN_PLACE = frozenset("__iadd__ __isub__ __imul__ __itruediv__ __idiv__ __ipow__".split())
# calls that carry attention scores (q·kᵀ) on to the softmax: scaling, masks and position biases, casts
_SCORE_OPS = frozenset("mul div add sub maskedfill where float to typeas contiguous clone".split())


def _canonical(func: Any) -> str:
    name = getattr(func, "__name__", "").strip("_").replace("_", "").lower()
    return _ALIASES.get(name, name)


def _is_method(func: Any) -> bool:
    return getattr(torch.Tensor, getattr(func, "__name__", ""), None) is func


def _tensors(obj: Any) -> list[Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]


def _is_torch_class(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


def _layer_layout(module: nn.Module, output: Tensor) -> Layout:
    ndim = output.ndim
    kind = get_layer_kind(module)
    if kind is not None and kind.channels == "first":
        spatial = len(getattr(module, "kernel_size", ())) or ndim - 2
        return Layout(1, ndim) if ndim == spatial + 2 else Layout(0, ndim)
    return Layout(max(ndim - 1, 0), max(ndim, 1))  # Linear, Embedding, RNN, attention: features last


def _permutation(name: str, args: tuple, ndim: int) -> list[int] | None:
    dims = [a for a in args[1:] if isinstance(a, int)]
    if len(args) > 1 and isinstance(args[1], (tuple, list)):
        dims = list(args[1])
    if name == "permute" and len(dims) == ndim:
        return [d % ndim for d in dims]
    if name in ("transpose", "swapaxes", "swapdims") and len(dims) == 2:
        order = list(range(ndim))
        a, b = dims[0] % ndim, dims[1] % ndim
        order[a], order[b] = order[b], order[a]
        return order
    if name == "t" and ndim == 2:
        return [1, 0]
    return None
