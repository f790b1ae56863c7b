"""The norm registry: kinds found by name, class or ``functools.partial``, and built for a layout and rank.

:func:`get_norm_layer` / :func:`create_norm_layer` / :func:`register_norm` follow timm's ``create_norm_layer`` style.
Kinds normalize over different axes: ``batch`` per channel over batch and positions (Ioffe & Szegedy 2015), ``layer``
and ``rms`` over the channels at each position (Ba et al. 2016; Zhang & Sennrich 2019), ``group`` per sample over
groups of channels and all positions (Wu & He 2018), ``instance`` per sample and channel over positions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_bn import checks
from lightning_bn.norms.modules import BatchNormXd, ChannelsFirst, ChannelsLast, InstanceNormXd

__all__ = [
    "Layout",
    "NormKind",
    "available_norms",
    "create_norm_layer",
    "default_num_groups",
    "get_norm_layer",
    "register_norm",
]

Layout = Literal["channels_first", "channels_last"]


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
        ValueError: for an unknown kind, a ``num_features`` or ``rank`` that is no positive int, a layout other than
            ``"channels_first"`` / ``"channels_last"``, a rank the kind cannot normalize, or a group count not
            dividing the channels.
        TypeError: for a ``spec`` that is no name, class, ``functools.partial`` or factory.

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
    checks.integer("num_features", num_features)
    if not isinstance(layout, str) or layout not in ("channels_first", "channels_last"):
        raise ValueError(f"Expected `layout` to be 'channels_first' or 'channels_last' but got {layout!r}")
    if rank is not None:
        checks.integer("rank", rank)
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
