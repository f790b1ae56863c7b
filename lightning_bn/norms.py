"""Normalization surgery: a norm registry, norm insertion after layers, and conversion between norm kinds.

:func:`get_norm_layer` / :func:`create_norm_layer` / :func:`register_norm` are the registry (timm's
``create_norm_layer`` style): a kind is found by name, class or ``functools.partial``. :func:`insert_norms` puts a norm
after every hidden Linear / Conv of an existing model, chosen from the shapes of one example forward pass;
:func:`convert_norms` turns the norms of a model into another kind in place, carrying affine parameters and running
statistics. Plain torch.

Kinds normalize over different axes: ``batch`` per channel over batch and positions (Ioffe & Szegedy 2015), ``layer``
and ``rms`` over the channels at each position (Ba et al. 2016; Zhang & Sennrich 2019), ``group`` per sample over
groups of channels and all positions (Wu & He 2018), ``instance`` per sample and channel over positions. A norm whose
channel axis differs from the data's (BatchNorm on ``(N, T, C)`` from a Linear, LayerNorm on ``(N, C, H, W)`` from a
Conv) is wrapped in :class:`ChannelsLast` / :class:`ChannelsFirst`, which move the channel axis around it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_leaves

from lightning_bn.init import LayerTrace, as_call, trace_activations

__all__ = [
    "BatchNormXd",
    "ChannelsFirst",
    "ChannelsLast",
    "InstanceNormXd",
    "InsertionPlan",
    "NormConversion",
    "NormInsertion",
    "NormKind",
    "NormReport",
    "available_norms",
    "convert_norms",
    "create_norm_layer",
    "default_num_groups",
    "final_layers",
    "get_norm_layer",
    "insert_norms",
    "plan_insertions",
    "register_norm",
]

Layout = Literal["channels_first", "channels_last"]
Position = Literal["pre", "post"]
POSITIONS = ("pre", "post")
#: ``norm="auto"`` takes BatchNorm from this example batch size up (Wu & He 2018: BN degrades below 16 per device).
AUTO_MIN_BATCH = 16


# ---- modules ------------------------------------------------------------------------------------------------------


class ChannelsLast(nn.Module):
    """Apply a channels-first norm (BatchNorm, GroupNorm, InstanceNorm: channels on dim 1) to ``(N, ..., C)`` data.

    Kept as a wrapper rather than a subclass so that ``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's
    ``sync_batchnorm=True``) converts the inner norm and the layout handling survives.

    Example::

        >>> norm = ChannelsLast(nn.BatchNorm1d(8))
        >>> norm(torch.randn(4, 10, 8)).shape
        torch.Size([4, 10, 8])
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(-1, 1)).movedim(1, -1)


class ChannelsFirst(nn.Module):
    """Apply a channels-last norm (LayerNorm, RMSNorm over the last dim) to ``(N, C, ...)`` data, per position.

    ``ChannelsFirst(nn.LayerNorm(C))`` on ``(N, C, H, W)`` is ConvNeXt's channel LayerNorm (timm's ``LayerNorm2d``).

    Example::

        >>> ChannelsFirst(nn.LayerNorm(8))(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class BatchNormXd(_BatchNorm):
    """BatchNorm for input of any rank >= 2 (as in mmcv's ``revert_sync_batchnorm``), for when the rank is unknown."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"Expected a (N, C, ...) input of rank >= 2 but got shape {tuple(input.shape)}")


class InstanceNormXd(_InstanceNorm):
    """InstanceNorm for input of any rank >= 3: the target when the rank is unknown."""

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 3:
            raise ValueError(f"Expected a (N, C, L, ...) input of rank >= 3 but got shape {tuple(input.shape)}")
        return self._apply_instance_norm(input)


# ---- registry -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormKind:
    """One kind of norm, as the registry knows it.

    Args:
        name: canonical name, e.g. ``"batch"``.
        factory: ``factory(num_features, **kwargs)`` builds the module (with ``rank=`` too when ``rank_aware``).
        channels: the axis the module takes the channels on: ``"first"`` (dim 1) or ``"last"`` (dim -1).
        centers_channels: per-channel mean subtraction (batch, instance): a bias just before it is redundant.
        batch_statistics: statistics over the batch, so they depend on the batch size.
        min_rank: smallest input rank the kind can normalize (instance norm needs a spatial axis).
        types: module classes recognized as this kind by :func:`convert_norms`.
        rank_aware: the factory takes ``rank=`` (the input rank, or ``None`` when unknown).
        kwargs: keyword arguments bound by a ``functools.partial``.
    """

    name: str
    factory: Callable[..., nn.Module]
    channels: Literal["first", "last"] = "first"
    centers_channels: bool = False
    batch_statistics: bool = False
    min_rank: int = 2
    types: tuple[type[nn.Module], ...] = ()
    rank_aware: bool = False
    kwargs: tuple[tuple[str, Any], ...] = ()


_NORMS: dict[str, NormKind] = {}
_ALIASES = {"bn": "batch", "ln": "layer", "gn": "group", "syncbn": "syncbatch", "in": "instance", "rmsn": "rms"}


def _normalize(name: str) -> str:
    key = re.sub(r"(norm)?([123]d)?$", "", re.sub(r"[^a-z0-9]", "", name.lower()))
    return _ALIASES.get(key, key)


def register_norm(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    channels: Literal["first", "last"] = "first",
    centers_channels: bool = False,
    batch_statistics: bool = False,
    min_rank: int = 2,
    types: tuple[type[nn.Module], ...] = (),
    overwrite: bool = False,
) -> NormKind:
    """Add a kind to the registry, so ``prepare(norm=name)``, :func:`insert_norms` and :func:`convert_norms` know it.

    ``factory(num_features, **kwargs)`` builds the module; ``channels`` says on which axis it takes them.

    Raises:
        ValueError: if the (normalized) name is taken and ``overwrite`` is False, or ``channels`` is not first/last.

    Example::

        >>> kind = register_norm("half_group", lambda c, **kw: nn.GroupNorm(c // 2, c, **kw), overwrite=True)
        >>> create_norm_layer("half_group", 8).num_groups
        4
    """
    if channels not in ("first", "last"):
        raise ValueError(f"Expected `channels` to be 'first' or 'last' but got {channels!r}")
    key = _normalize(name)
    if key in _NORMS and not overwrite:
        raise ValueError(f"Expected a new norm name but got {name!r}, which is already registered")
    kind = NormKind(name, factory, channels, centers_channels, batch_statistics, min_rank, tuple(types))
    _NORMS[key] = kind
    return kind


def available_norms() -> list[str]:
    """Canonical names of every registered kind."""
    return sorted(kind.name for kind in _NORMS.values())


def _kind_of_type(cls: type) -> NormKind | None:
    for exact in (True, False):
        for kind in _NORMS.values():
            if (cls in kind.types) if exact else (kind.types and issubclass(cls, kind.types)):
                return kind
    return None


def get_norm_layer(spec: str | type[nn.Module] | functools.partial | Callable | NormKind | None) -> NormKind | None:
    """Resolve a name, a norm class, a ``functools.partial`` of one, a factory or ``None`` to a :class:`NormKind`.

    Names are normalized: ``"batch_norm"``, ``"BatchNorm"``, ``"batchnorm2d"`` and ``"bn"`` are the same kind. A torch
    norm class maps to its kind (``nn.BatchNorm2d`` -> ``batch``, built for the rank it meets); the keywords of a
    partial are bound (``partial(nn.GroupNorm, num_groups=8)``). Any other class or callable is used as
    ``factory(num_features, **kwargs)``, channels first (last for LayerNorm / RMSNorm subclasses).

    Raises:
        ValueError: for an unknown name (the message lists the known ones), or a partial with positional arguments.
        TypeError: for anything else.

    Example::

        >>> get_norm_layer("BatchNorm").name, get_norm_layer(nn.GroupNorm).name
        ('batch', 'group')
        >>> dict(get_norm_layer(functools.partial(nn.GroupNorm, num_groups=4)).kwargs)
        {'num_groups': 4}
    """
    if spec is None or isinstance(spec, NormKind):
        return spec
    if isinstance(spec, str):
        if not spec:
            return None
        kind = _NORMS.get(_normalize(spec))
        if kind is None:
            raise ValueError(f"Expected a norm, one of {available_norms()} or 'auto', but got {spec!r}")
        return kind
    if isinstance(spec, functools.partial):
        if spec.args:
            raise ValueError(f"Expected a partial with keyword arguments only (e.g. num_groups=8) but got {spec!r}")
        kind = get_norm_layer(spec.func)
        return replace(kind, kwargs=tuple({**dict(kind.kwargs), **spec.keywords}.items()))
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        kind = _kind_of_type(spec)
        if kind is not None and spec in kind.types:
            return kind
        last = issubclass(spec, (nn.LayerNorm, nn.RMSNorm))
        return NormKind(
            spec.__name__,
            spec,
            "last" if last else "first",
            centers_channels=bool(kind and kind.centers_channels),
            batch_statistics=bool(kind and kind.batch_statistics),
            min_rank=kind.min_rank if kind else 2,
            types=(spec,),
        )
    if callable(spec):
        return NormKind(getattr(spec, "__name__", repr(spec)), spec)
    raise TypeError(f"Expected a norm name, class, functools.partial or None but got {spec!r}")


def default_num_groups(num_channels: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides ``num_channels`` (32 is Wu & He's default)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if num_channels % g == 0)


def create_norm_layer(
    spec: Any,
    num_features: int,
    *,
    layout: Layout = "channels_first",
    rank: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a norm of kind ``spec`` over ``num_features`` channels for data of ``layout`` and ``rank``.

    The module is wrapped in :class:`ChannelsLast` / :class:`ChannelsFirst` when the kind takes its channels on the
    other axis and the rank is not 2 (on ``(N, C)`` both layouts are the same). A known rank picks the class
    (``BatchNorm1d/2d/3d``); an unknown one gives the rank-agnostic :class:`BatchNormXd` / :class:`InstanceNormXd`.

    Raises:
        ValueError: for an unknown kind, a rank the kind cannot normalize, or a group count not dividing the channels.

    Example::

        >>> type(create_norm_layer("batch_norm", 16, rank=4)).__name__
        'BatchNorm2d'
        >>> norm = create_norm_layer("batch", 16, layout="channels_last", rank=3)
        >>> type(norm).__name__, type(norm.norm).__name__
        ('ChannelsLast', 'BatchNorm1d')
    """
    kind = get_norm_layer(spec)
    if kind is None:
        raise ValueError(f"Expected a norm, one of {available_norms()}, but got {spec!r}")
    if layout not in ("channels_first", "channels_last"):
        raise ValueError(f"Expected `layout` to be 'channels_first' or 'channels_last' but got {layout!r}")
    if rank is not None and rank < kind.min_rank:
        raise ValueError(f"{kind.name} norm needs an input of rank >= {kind.min_rank}, but the data has rank {rank}")
    merged = {**dict(kind.kwargs), **kwargs}
    if kind.rank_aware:
        merged["rank"] = rank
    module = kind.factory(num_features, **merged)
    data_first = layout == "channels_first"
    if rank == 2 or data_first == (kind.channels == "first"):
        return module
    return ChannelsFirst(module) if data_first else ChannelsLast(module)


def _batch(num_features: int, *, rank: int | None = None, **kwargs: Any) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, BatchNormXd)
    return cls(num_features, **kwargs)


def _instance(num_features: int, *, rank: int | None = None, affine: bool = True, **kwargs: Any) -> nn.Module:
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(rank, InstanceNormXd)
    return cls(num_features, affine=affine, **kwargs)


def _group(num_features: int, *, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    groups = default_num_groups(num_features) if num_groups is None else num_groups
    if groups < 1 or num_features % groups:
        raise ValueError(f"group norm needs a group count dividing {num_features} channels, but got {groups}")
    return nn.GroupNorm(groups, num_features, **kwargs)


def _layer(num_features: int, *, affine: bool = True, **kwargs: Any) -> nn.Module:
    return nn.LayerNorm(num_features, elementwise_affine=affine, **kwargs)


def _rms(num_features: int, *, affine: bool = True, **kwargs: Any) -> nn.Module:
    return nn.RMSNorm(num_features, elementwise_affine=affine, **kwargs)


for _kind in (
    NormKind("batch", _batch, "first", True, True, 2, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNormXd),
             rank_aware=True),
    NormKind("sync_batch", nn.SyncBatchNorm, "first", True, True, 2, (nn.SyncBatchNorm,)),
    NormKind("instance", _instance, "first", True, False, 3, (_InstanceNorm,), rank_aware=True),
    NormKind("group", _group, "first", types=(nn.GroupNorm,)),
    NormKind("layer", _layer, "last", min_rank=1, types=(nn.LayerNorm,)),
    NormKind("rms", _rms, "last", min_rank=1, types=(nn.RMSNorm,)),
):  # fmt: skip
    _NORMS[_normalize(_kind.name)] = _kind


# ---- reports ------------------------------------------------------------------------------------------------------


@dataclass
class NormInsertion:
    """One inserted norm: after which layer, where, what, and whether the layer's bias went."""

    layer: str
    norm: str
    module: str
    position: str
    shape: tuple[int, ...]
    bias_removed: bool = False


@dataclass
class NormConversion:
    """One converted norm: its name after the change, the classes before and after, and the state carried over."""

    name: str
    before: str
    after: str
    carried: list[str] = field(default_factory=list)


@dataclass
class NormReport:
    """What :func:`insert_norms` / :func:`convert_norms` did, including every ``state_dict`` key renamed or removed.

    ``renamed_keys`` maps old to new keys: ``{renamed_keys.get(k, k): v for k, v in old.items()}`` moves an old
    state dict onto the changed model (drop ``removed_keys`` first).
    """

    insertions: list[NormInsertion] = field(default_factory=list)
    conversions: list[NormConversion] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    renamed_keys: dict[str, str] = field(default_factory=dict)
    removed_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "insertions": [asdict(i) for i in self.insertions],
            "conversions": [asdict(c) for c in self.conversions],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
            "renamed_keys": dict(self.renamed_keys),
            "removed_keys": list(self.removed_keys),
        }

    def lines(self) -> list[str]:
        out = [
            f"inserted {i.module} as {i.norm} after {i.layer}"
            + (" (pre-activation)" if i.position == "pre" else " (post-activation)")
            + ("; its bias removed (redundant)" if i.bias_removed else "")
            for i in self.insertions
        ]
        out += [f"converted {c.name}: {c.before} -> {c.after} (carried {', '.join(c.carried) or 'nothing'})"
                for c in self.conversions]  # fmt: skip
        out += [f"skipped {n}: {r}" for n, r in self.skipped]
        out += [f"renamed key {old} -> {new}" for old, new in self.renamed_keys.items()]
        out += [f"removed key {k}" for k in self.removed_keys]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# ---- insertion ----------------------------------------------------------------------------------------------------


@dataclass
class _Site:
    layer: str
    target: str  # the module wrapped: the layer ("pre") or its activation module ("post")
    norm: nn.Module
    position: str
    shape: tuple[int, ...]
    remove_bias: bool


@dataclass
class InsertionPlan:
    """Norms built and checked for every site, not yet in the model: :meth:`apply` puts them in."""

    sites: list[_Site] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def apply(self, model: nn.Module) -> NormReport:
        """Replace each target ``m`` by ``nn.Sequential(m, norm)`` and drop the redundant biases; all or nothing."""
        report = NormReport(skipped=list(self.skipped))
        undo: list[Callable[[], None]] = []
        try:
            for site in self.sites:
                self._apply_site(model, site, report, undo)
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        return report

    @staticmethod
    def _apply_site(model: nn.Module, site: _Site, report: NormReport, undo: list[Callable[[], None]]) -> None:
        layer = model.get_submodule(site.layer)
        target = model.get_submodule(site.target)
        parent_name, _, attr = site.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        keys = list(target.state_dict())
        if site.remove_bias:
            bias = layer.bias
            layer.register_parameter("bias", None)
            undo.append(lambda: layer.register_parameter("bias", bias))
            report.removed_keys.append(f"{site.layer}.bias")
            if target is layer:
                keys.remove("bias")
        setattr(parent, attr, nn.Sequential(target, site.norm))
        undo.append(lambda: setattr(parent, attr, target))
        report.renamed_keys.update({f"{site.target}.{k}": f"{site.target}.0.{k}" for k in keys})
        report.insertions.append(
            NormInsertion(site.layer, f"{site.target}.1", _describe(site.norm), site.position, site.shape,
                          site.remove_bias)
        )  # fmt: skip


def _describe(norm: nn.Module) -> str:
    """Short name of a norm: ``BatchNorm1d(32)``, ``GroupNorm(8, 64)``, ``ChannelsLast(BatchNorm1d(16))``."""
    if isinstance(norm, (ChannelsLast, ChannelsFirst)):
        return f"{type(norm).__name__}({_describe(norm.norm)})"
    if isinstance(norm, nn.GroupNorm):
        return f"GroupNorm({norm.num_groups}, {norm.num_channels})"
    if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
        return f"{type(norm).__name__}({', '.join(map(str, norm.normalized_shape))})"
    if isinstance(norm, _NormBase):
        return f"{type(norm).__name__}({norm.num_features})"
    return type(norm).__name__


@contextlib.contextmanager
def _eval_with_grad(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def final_layers(model: nn.Module, example_input: Any, names: Sequence[str]) -> set[str]:
    """Which of the named layers feed the model's output without another named layer in between.

    Walks the autograd graph of one eval-mode forward pass back from the outputs and stops at each layer's output
    node, so ``log_softmax(head(x))`` or ``sigmoid(head(x))`` still mark ``head`` as the output layer.
    """
    args, kwargs = as_call(model, example_input)
    modules = dict(model.named_modules())
    nodes: dict[Any, str] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.grad_fn is not None:
                nodes.setdefault(output.grad_fn, name)

        return record

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        with _eval_with_grad(model):
            output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    found: set[str] = set()
    stack = [t.grad_fn for t in tree_leaves(output) if isinstance(t, Tensor) and t.grad_fn]
    seen = set(stack)
    while stack:
        node = stack.pop()
        if node in nodes:
            found.add(nodes[node])
            continue
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return found


def _auto_kind(trace: LayerTrace, channels_last: bool) -> str:
    shape = trace.output_shape
    if channels_last and len(shape) > 2:
        return "layer"  # a sequence (N, T, C): LayerNorm, as in Transformers
    if shape[0] >= AUTO_MIN_BATCH:
        return "batch"
    return "layer" if channels_last else "group"


def plan_insertions(
    model: nn.Module,
    example_input: Any,
    traces: dict[str, LayerTrace],
    norm: Any = "batch",
    position: Position = "pre",
    exclude: Sequence[str] | None = None,
    keep_bias: bool = False,
) -> InsertionPlan:
    """Choose, build and check a norm for every hidden Linear / Conv of ``traces``, without touching ``model``.

    See :func:`insert_norms` for the rules. Raises ``ValueError`` naming the layer for any site that cannot take one.
    """
    if position not in POSITIONS:
        raise ValueError(f"Expected `position` to be one of {list(POSITIONS)} but got {position!r}")
    kind = None if norm == "auto" else get_norm_layer(norm)
    if kind is None and norm != "auto":
        raise ValueError(f"Expected a norm, one of {available_norms()} or 'auto', but got {norm!r}")
    exclude = list(exclude or [])
    candidates = {n: t for n, t in traces.items() if n and isinstance(t.module, (nn.Linear, nn.modules.conv._ConvNd))}
    final = final_layers(model, example_input, list(candidates))
    consumers: dict[str, list[str]] = {}
    for name, trace in candidates.items():
        if trace.consumer is not None:
            consumers.setdefault(trace.consumer, []).append(name)
    plan = InsertionPlan()
    for name, trace in candidates.items():
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            plan.skipped.append((name, "norm not inserted: excluded"))
        elif trace.how == "output" or name in final:
            plan.skipped.append((name, "norm not inserted: output layer"))
        elif trace.norm_after is not None:
            plan.skipped.append((name, f"norm not inserted: already followed by norm {trace.norm_after!r}"))
        else:
            plan.sites.append(_plan_site(name, trace, kind, position, keep_bias, consumers))
    return plan


def _plan_site(
    name: str,
    trace: LayerTrace,
    kind: NormKind | None,
    position: str,
    keep_bias: bool,
    consumers: dict[str, list[str]],
) -> _Site:
    layer, shape = trace.module, trace.output_shape
    channels_last = isinstance(layer, nn.Linear)
    if not channels_last and len(shape) != len(layer.kernel_size) + 2:
        raise ValueError(f"Cannot insert a norm after {name!r}: expected a batched output but got shape {shape}")
    target = name
    if position == "post" and trace.how in ("function", "method"):
        raise ValueError(
            f"Cannot insert a norm after the activation of {name!r}: position='post' needs an activation module, but "
            f"{trace.activation.describe()} is called as a {trace.how}; use position='pre' or an nn.Module activation"
        )
    if position == "post" and trace.how == "module":
        shared = consumers.get(trace.consumer, [])
        if len(shared) > 1:
            raise ValueError(
                f"Cannot insert a norm after the activation of {name!r}: position='post' needs one activation module "
                f"per layer, but {trace.consumer!r} follows {shared}"
            )
        target = trace.consumer
    resolved = get_norm_layer(_auto_kind(trace, channels_last)) if kind is None else kind
    channels = shape[-1] if channels_last else shape[1]
    try:
        norm = create_norm_layer(
            resolved, channels, layout="channels_last" if channels_last else "channels_first", rank=len(shape)
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"Cannot insert a {resolved.name} norm after {name!r} (output shape {shape}): {err}") from err
    weight = layer.weight
    norm.to(device=weight.device, dtype=weight.dtype).train(layer.training)
    remove_bias = (
        not keep_bias and target == name and resolved.centers_channels and getattr(layer, "bias", None) is not None
    )
    return _Site(name, target, norm, "post" if target != name else "pre", shape, remove_bias)


def insert_norms(
    model: nn.Module,
    example_input: Any,
    norm: Any = "batch",
    position: Position = "pre",
    exclude: Sequence[str] | None = None,
    keep_bias: bool = False,
) -> NormReport:
    """Insert a norm after every hidden Linear / Conv of ``model``, in place, and report what changed.

    One traced forward pass on ``example_input`` finds, per layer, its output shape and the activation after it.
    Every Linear / Conv whose output feeds a later layer gets a norm; layers whose output reaches the model output
    (logits, ``sigmoid(head(x))``), layers already followed by a norm and layers matching an ``exclude`` glob are left
    alone and listed in ``skipped``. With ``position="pre"`` the layer ``m`` becomes ``nn.Sequential(m, norm)`` (its
    keys move from ``m.weight`` to ``m.0.weight``: see ``renamed_keys``); with ``"post"`` its activation module does.
    Shapes: ``(N, C)`` from a Linear, ``(N, T, C)`` from a Linear (channels last, the BatchNorm/GroupNorm wrapped in
    :class:`ChannelsLast`), ``(N, C, *)`` from a Conv (LayerNorm/RMSNorm wrapped in :class:`ChannelsFirst`).
    ``norm="auto"``: LayerNorm for sequences, BatchNorm when the example batch has at least :data:`AUTO_MIN_BATCH`
    samples, else LayerNorm (Linear) or GroupNorm (Conv). Before a per-channel-centering norm (batch, instance) the
    layer's bias is redundant and removed unless ``keep_bias``. New norms start at γ = 1, β = 0, on the layer's
    device and dtype, in its train/eval mode. Every site is checked first: on an error the model is untouched.

    Args:
        model: any ``nn.Module``.
        example_input: a Tensor, tuple of args or dict of kwargs; its batch size drives ``norm="auto"``.
        norm: ``"auto"``, a registered name, a norm class or a ``functools.partial`` (see :func:`get_norm_layer`).
        position: ``"pre"`` (between the layer and its activation) or ``"post"`` (after an activation module).
        exclude: glob patterns on qualified layer names.
        keep_bias: keep biases a following BatchNorm makes redundant.

    Raises:
        ValueError: naming the layer and value: unknown norm, bad position, ``"post"`` after a functional or shared
            activation, a shape the kind cannot normalize (group count not dividing, rank too small).

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> report = insert_norms(net, torch.randn(64, 8))
        >>> [type(m).__name__ for m in net[0]], net[0][0].bias is None
        (['Linear', 'BatchNorm1d'], True)
        >>> report.renamed_keys, report.removed_keys
        ({'0.weight': '0.0.weight'}, ['0.bias'])
    """
    traces = trace_activations(model, example_input)
    return plan_insertions(model, example_input, traces, norm, position, exclude, keep_bias).apply(model)


# ---- conversion ---------------------------------------------------------------------------------------------------

_CARRIED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _norm_units(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """``(name, unit, inner norm, data layout)`` for each norm; a unit is a wrapper with its norm, or a bare norm."""
    inside = set()
    for name, module in model.named_modules():
        if not name:
            continue  # the model itself cannot be replaced in place
        if isinstance(module, (ChannelsLast, ChannelsFirst)):
            inside.add(id(module.norm))
            yield name, module, module.norm, "channels_last" if isinstance(module, ChannelsLast) else "channels_first"
        elif id(module) not in inside and _kind_of_type(type(module)) is not None:
            kind = _kind_of_type(type(module))
            yield name, module, module, "channels_last" if kind.channels == "last" else "channels_first"


def _channels(name: str, norm: nn.Module) -> int:
    if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
        if len(norm.normalized_shape) != 1:
            raise ValueError(
                f"Cannot convert {name!r}: {type(norm).__name__} over {tuple(norm.normalized_shape)} is no per-channel "
                "norm; exclude it"
            )
        return norm.normalized_shape[0]
    return norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features


def _input_ranks(model: nn.Module, example_input: Any, modules: list[nn.Module]) -> dict[int, int]:
    ranks: dict[int, int] = {}

    def record(module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            ranks.setdefault(id(module), inputs[0].dim())

    handles = [m.register_forward_pre_hook(record) for m in modules]
    args, kwargs = as_call(model, example_input)
    try:
        with _eval_with_grad(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return ranks


_KNOWN_RANKS = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5, nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def convert_norms(
    model: nn.Module,
    to: Any,
    *,
    num_groups: int | None = None,
    exclude: Sequence[str] | None = None,
    example_input: Any = None,
) -> NormReport:
    """Replace every norm of ``model`` by one of kind ``to``, in place, carrying its state; report what changed.

    Affine parameters (γ, β), ``eps`` and, where both sides have them, running statistics, momentum and
    ``track_running_stats`` carry over; the new module keeps the old one's device, dtype and train/eval mode and the
    data layout (a LayerNorm in a Transformer becomes ``ChannelsLast(GroupNorm)``). BatchNorm -> SyncBatchNorm ->
    BatchNorm round-trips the running statistics; Lightning's ``sync_batchnorm=True`` covers only the first step.
    The rank is read from the class (``BatchNorm2d``) or, with ``example_input``, from one forward pass; when unknown,
    ``batch`` and ``instance`` become the rank-agnostic :class:`BatchNormXd` / :class:`InstanceNormXd`.

    Args:
        model: the model.
        to: ``"group"``, ``"layer"``, ``"batch"``, ``"sync_batch"``, ``"instance"``, ``"rms"`` or any registered kind.
        num_groups: group count for ``to="group"`` (default: :func:`default_num_groups` per norm).
        exclude: glob patterns on qualified norm names.
        example_input: optional Tensor, tuple or dict for one eval-mode forward pass that reads each norm's rank.

    Raises:
        ValueError: naming the norm, for an unknown kind, a group count not dividing its channels, instance norm on a
            rank-2 input, or a LayerNorm over more than one axis. Checked before anything changes.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> report = convert_norms(net, "group", num_groups=4)
        >>> net[1].num_groups, report.conversions[0].carried
        (4, ['weight', 'bias'])
    """
    target = get_norm_layer(to)
    if target is None:
        raise ValueError(f"Expected `to` to be a norm, one of {available_norms()}, but got {to!r}")
    exclude = list(exclude or [])
    units = [u for u in _norm_units(model) if not any(fnmatch.fnmatchcase(u[0], p) for p in exclude)]
    ranks = _input_ranks(model, example_input, [u[2] for u in units]) if example_input is not None else {}
    report = NormReport()
    built: list[tuple[str, nn.Module, nn.Module, nn.Module]] = []
    for name, unit, norm, layout in units:
        source = _kind_of_type(type(norm))
        if source is not None and source.name == target.name:
            report.skipped.append((name, f"already {target.name}"))
            continue
        rank = ranks.get(id(norm), _KNOWN_RANKS.get(type(norm)))
        kwargs: dict[str, Any] = {"eps": norm.eps, "affine": getattr(norm, "weight", None) is not None}
        if target.name == "group":
            kwargs["num_groups"] = num_groups
        if isinstance(norm, _NormBase) and target.batch_statistics:
            kwargs |= {"momentum": norm.momentum, "track_running_stats": norm.track_running_stats}
        try:
            new = create_norm_layer(target, _channels(name, norm), layout=layout, rank=rank, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Cannot convert {name!r} ({type(norm).__name__}) to {target.name}: {err}") from err
        built.append((name, unit, norm, new))
    for name, unit, norm, new in built:
        _swap(model, name, unit, norm, new, report)
    return report


def _swap(model: nn.Module, name: str, unit: nn.Module, norm: nn.Module, new: nn.Module, report: NormReport) -> None:
    inner = new.norm if isinstance(new, (ChannelsLast, ChannelsFirst)) else new
    old_prefix = f"{name}.norm" if unit is not norm else name
    new_prefix = f"{name}.norm" if inner is not new else name
    carried = []
    with torch.no_grad():
        for key in _CARRIED:
            src, dst = getattr(norm, key, None), getattr(inner, key, None)
            if isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                carried.append(key)
    reference = next(iter(norm.state_dict().values()), None)
    if reference is not None:
        floating = next((t for t in norm.state_dict().values() if t.is_floating_point()), reference)
        new.to(device=reference.device, dtype=floating.dtype)
    new.train(norm.training)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    for key in norm.state_dict():
        if key in carried and old_prefix != new_prefix:
            report.renamed_keys[f"{old_prefix}.{key}"] = f"{new_prefix}.{key}"
        elif key not in carried:
            report.removed_keys.append(f"{old_prefix}.{key}")
    report.conversions.append(NormConversion(name, _describe(unit), _describe(new), carried))
