"""Norm conversion: turn the norms of a model into another kind in place, carrying affine parameters and statistics."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.hooks import RemovableHandle

from lightning_bn import checks
from lightning_bn.norms.insert import _aliases, _check_exclude, _check_model, _describe, _excluded, _slots
from lightning_bn.norms.modules import ChannelsFirst, ChannelsLast
from lightning_bn.norms.registry import _kind_of_type, available_norms, create_norm_layer, get_norm_layer
from lightning_bn.norms.report import NormConversion, NormReport
from lightning_bn.tracing import HookSet, as_call, model_state, run_forward

__all__ = ["convert_norms"]

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


class _InputRanks(HookSet):
    """Forward pre-hooks recording the rank of each module's first input, by ``id`` (first call wins)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.modules = modules
        self.ranks: dict[int, int] = {}

    def _register(self) -> Iterable[RemovableHandle]:
        for module in self.modules:
            yield module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            self.ranks.setdefault(id(module), inputs[0].dim())


def _input_ranks(model: nn.Module, example_input: Any, modules: list[nn.Module]) -> dict[int, int]:
    """The input rank of each of ``modules`` in one eval-mode forward pass under ``no_grad``."""
    args, kwargs = as_call(model, example_input)
    with _InputRanks(modules) as hooks, model_state(model, train=False, grad=False):
        run_forward(model, args, kwargs)
    return hooks.ranks


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
    ``batch`` becomes the rank-agnostic :class:`BatchNormXd`. A kind that needs spatial dimensions (``instance``: rank
    >= 3) is refused for a norm of unknown rank without ``example_input`` (a ``BatchNorm1d`` may see ``(N, C)``, on
    which an InstanceNorm fails); with it, a norm the pass did not reach becomes :class:`InstanceNormXd`.
    A norm shared under several names (``net.a = net.b = bn``) is converted once and the new module set under every
    name, so the aliases stay one module; ``exclude`` matching any of its names leaves it alone.

    Args:
        model: the model.
        to: ``"group"``, ``"layer"``, ``"batch"``, ``"sync_batch"``, ``"instance"``, ``"rms"`` or any registered kind.
        num_groups: a positive int, the group count for ``to="group"`` (default: :func:`default_num_groups` per
            norm).
        exclude: a list or tuple of glob patterns on qualified norm names.
        example_input: optional Tensor, tuple or dict for one eval-mode forward pass that reads each norm's rank.

    Raises:
        ValueError: naming the norm or value, for an unknown kind, a ``num_groups`` that is no positive int or does
            not divide a norm's channels, instance norm on a rank-2 input or on an unknown rank without
            ``example_input``, a LayerNorm over more than one axis, a norm shared both inside and outside a
            :class:`ChannelsLast` / :class:`ChannelsFirst` wrapper, or an example input that fails in ``forward``.
            Checked before anything changes.
        TypeError: for a ``model`` that is no ``nn.Module`` or an ``exclude`` that is not a list of strings.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> report = convert_norms(net, "group", num_groups=4)
        >>> net[1].num_groups, report.conversions[0].carried
        (4, ['weight', 'bias'])
        >>> shared = nn.BatchNorm1d(8)
        >>> net = nn.Sequential(nn.Linear(8, 8), shared, nn.ReLU(), nn.Linear(8, 8), shared)
        >>> _ = convert_norms(net, "group", num_groups=2)
        >>> type(net[1]).__name__, net[1] is net[4]
        ('GroupNorm', True)
    """
    _check_model(model)
    target = get_norm_layer(to)
    if target is None:
        raise ValueError(f"Expected `to` to be a norm, one of {available_norms()}, but got {to!r}")
    if num_groups is not None:
        checks.integer("num_groups", num_groups)
    exclude = _check_exclude(exclude)
    aliases = _aliases(model)
    units = [u for u in _norm_units(model) if not _excluded(aliases.get(id(u[1]), [u[0]]), exclude)]
    ranks = _input_ranks(model, example_input, [u[2] for u in units]) if example_input is not None else {}
    report = NormReport()
    built: list[tuple[list[str], nn.Module, nn.Module, nn.Module]] = []
    for name, unit, norm, layout in units:
        names = aliases.get(id(unit), [name])
        if unit is not norm:
            outside = [n for n in aliases.get(id(norm), []) if n not in {f"{a}.norm" for a in names}]
            if outside:
                raise ValueError(
                    f"Cannot convert {name!r}: its {type(norm).__name__} is shared inside and outside the "
                    f"{type(unit).__name__} wrapper, as {[f'{a}.norm' for a in names] + outside}; exclude it"
                )
        source = _kind_of_type(type(norm))
        if source is not None and source.name == target.name:
            report.skipped.append((name, f"already {target.name}"))
            continue
        rank = ranks.get(id(norm), _KNOWN_RANKS.get(type(norm)))
        if rank is None and example_input is None and target.min_rank > 2:
            raise ValueError(
                f"Cannot convert {name!r} ({type(norm).__name__}) to {target.name}: its input rank is unknown and "
                f"{target.name} norm needs an input of rank >= {target.min_rank} (spatial dimensions); pass "
                "`example_input=` so that one forward pass reads it"
            )
        kwargs: dict[str, Any] = {"eps": norm.eps, "affine": getattr(norm, "weight", None) is not None}
        if target.name == "group":
            kwargs["num_groups"] = num_groups
        if isinstance(norm, _NormBase) and target.batch_statistics:
            kwargs |= {"momentum": norm.momentum, "track_running_stats": norm.track_running_stats}
        try:
            new = create_norm_layer(target, _channels(name, norm), layout=layout, rank=rank, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Cannot convert {name!r} ({type(norm).__name__}) to {target.name}: {err}") from err
        built.append((names, unit, norm, new))
    for names, unit, norm, new in built:
        _swap(model, names, unit, norm, new, report)
    return report


def _swap(
    model: nn.Module, names: list[str], unit: nn.Module, norm: nn.Module, new: nn.Module, report: NormReport
) -> None:
    """Carry the state of ``norm`` into ``new`` and set ``new`` under every name of ``unit``."""
    inner = new.norm if isinstance(new, (ChannelsLast, ChannelsFirst)) else new
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
    for parent, attr in _slots(model, names):
        setattr(parent, attr, new)
    for name in names:
        old_prefix = f"{name}.norm" if unit is not norm else name
        new_prefix = f"{name}.norm" if inner is not new else name
        for key in norm.state_dict():
            if key in carried and old_prefix != new_prefix:
                report.renamed_keys[f"{old_prefix}.{key}"] = f"{new_prefix}.{key}"
            elif key not in carried:
                report.removed_keys.append(f"{old_prefix}.{key}")
    report.conversions.append(NormConversion(names[0], _describe(unit), _describe(new), carried))
