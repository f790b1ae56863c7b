"""Norm insertion: a norm after every hidden Linear / Conv of an existing model, chosen from one traced forward pass.

:func:`plan_insertions` builds and checks a norm for every site from the layer traces, running no forward pass of its
own; :meth:`InsertionPlan.apply` puts them in, all or nothing; :func:`insert_norms` traces and does both.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch  # noqa: F401 - the doctests use it
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_bn.norms.modules import ChannelsFirst, ChannelsLast
from lightning_bn.norms.registry import NormKind, _kind_of_type, available_norms, create_norm_layer, get_norm_layer
from lightning_bn.norms.report import NormInsertion, NormReport
from lightning_bn.tracing import NORM_TYPES, LayerTrace, trace_activations, trace_model

__all__ = [
    "AUTO_MIN_BATCH",
    "POSITIONS",
    "InsertionPlan",
    "Position",
    "final_layers",
    "insert_norms",
    "plan_insertions",
]

Position = Literal["pre", "post"]
POSITIONS = ("pre", "post")
#: ``norm="auto"`` takes BatchNorm from this example batch size up (Wu & He 2018: BN degrades below 16 per device).
AUTO_MIN_BATCH = 16


@dataclass
class _Site:
    layer: str
    target: str  # the module wrapped: the layer ("pre") or its activation module ("post")
    norm: nn.Module
    position: str
    shape: tuple[int, ...]
    remove_bias: bool
    layer_aliases: tuple[str, ...] = ()  # every name of the layer (a module shared under several names)
    target_aliases: tuple[str, ...] = ()  # every name of the target: each gets the same Sequential(target, norm)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module but got {model!r}")


def _check_exclude(exclude: Any) -> list[str]:
    """``exclude`` as a list of glob patterns; a string (which would be read character by character) is refused."""
    if exclude is None:
        return []
    if not isinstance(exclude, (list, tuple)) or not all(isinstance(p, str) for p in exclude):
        raise TypeError(f"Expected `exclude` to be a list or tuple of glob patterns (str) but got {exclude!r}")
    return list(exclude)


def _excluded(names: Sequence[str], exclude: Sequence[str]) -> bool:
    """True if any name of a module matches any glob: changing one name of a shared module changes them all."""
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude)


def _check_insert_arguments(norm: Any, position: Any, exclude: Any, keep_bias: Any) -> tuple[NormKind | None, list]:
    """Check the arguments of :func:`insert_norms` / :func:`plan_insertions`, naming the bad value."""
    if not isinstance(position, str) or position not in POSITIONS:
        raise ValueError(f"Expected `position` to be one of {list(POSITIONS)} but got {position!r}")
    if not isinstance(keep_bias, bool):
        raise ValueError(f"Expected `keep_bias` to be True or False but got {keep_bias!r}")
    exclude = _check_exclude(exclude)
    if isinstance(norm, str) and norm == "auto":
        return None, exclude
    kind = get_norm_layer(norm)
    if kind is None:
        raise ValueError(f"Expected `norm` to be a norm, one of {available_norms()} or 'auto', but got {norm!r}")
    return kind, exclude


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every submodule, by ``id``, in ``named_modules`` order (the first is the trace's)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(module), []).append(name)
    return names


def _slots(model: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, str]]:
    """The distinct ``(parent, attribute)`` slots behind ``names`` (a shared parent gives one slot for many names)."""
    slots: dict[tuple[int, str], tuple[nn.Module, str]] = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        slots.setdefault((id(parent), attr), (parent, attr))
    return list(slots.values())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (ChannelsLast, ChannelsFirst, *NORM_TYPES)) or _kind_of_type(type(module)) is not None


def _norm_following(model: nn.Module, names: Sequence[str]) -> str | None:
    """The name of a norm that directly follows the module called ``names`` in an ``nn.Sequential``, if any.

    This is how an earlier insertion looks (``Sequential(layer_or_activation, norm)``), whatever norm it was.
    """
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(parent, nn.Sequential):
            continue
        keys = list(parent._modules)
        index = keys.index(attr) + 1
        if index < len(keys) and parent._modules[keys[index]] is not None and _is_norm(parent._modules[keys[index]]):
            return f"{parent_name}.{keys[index]}" if parent_name else keys[index]
    return None


@dataclass
class InsertionPlan:
    """Norms built and checked for every site, not yet in the model: :meth:`apply` puts them in."""

    sites: list[_Site] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def apply(self, model: nn.Module) -> NormReport:
        """Replace each target ``m`` by ``nn.Sequential(m, norm)`` and drop the redundant biases; all or nothing.

        A target shared under several names gets the same ``nn.Sequential`` under every name, so it stays shared.
        """
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
        slots = _slots(model, site.target_aliases or (site.target,))
        keys = list(target.state_dict())
        if site.remove_bias:
            bias = layer.bias
            layer.register_parameter("bias", None)
            undo.append(lambda: layer.register_parameter("bias", bias))
            report.removed_keys.extend(f"{name}.bias" for name in site.layer_aliases or (site.layer,))
            if target is layer:
                keys.remove("bias")
        wrapper = nn.Sequential(target, site.norm)
        for parent, attr in slots:
            setattr(parent, attr, wrapper)
            undo.append(lambda parent=parent, attr=attr: setattr(parent, attr, target))
        for name in site.target_aliases or (site.target,):
            report.renamed_keys.update({f"{name}.{k}": f"{name}.0.{k}" for k in keys})
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


def final_layers(model: nn.Module, example_input: Any, names: Sequence[str]) -> set[str]:
    """Which of the named layers feed the model's output without another layer in between.

    Read off one traced forward pass (:func:`~lightning_bn.tracing.trace_model`, each layer's ``final``), so
    ``log_softmax(head(x))`` or ``sigmoid(head(x))`` still mark ``head`` as the output layer.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Sigmoid())
        >>> final_layers(net, torch.randn(3, 4), ["0", "2"])
        {'2'}
    """
    return {n for n, t in trace_model(model, example_input).layers.items() if t.final and n in names}


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
    Runs no forward pass: the output layers are the traces' ``final`` ones (``example_input`` is kept for the
    signature's sake and not used).
    """
    _check_model(model)
    kind, exclude = _check_insert_arguments(norm, position, exclude, keep_bias)
    candidates = {n: t for n, t in traces.items() if n and isinstance(t.module, (nn.Linear, nn.modules.conv._ConvNd))}
    consumers: dict[str, list[str]] = {}
    for name, trace in candidates.items():
        if trace.consumer is not None:
            consumers.setdefault(trace.consumer, []).append(name)
    aliases = _aliases(model)
    plan = InsertionPlan()
    for name, trace in candidates.items():
        names = aliases.get(id(trace.module), [name])
        if _excluded(names, exclude):
            plan.skipped.append((name, "norm not inserted: excluded"))
        elif trace.how == "output" or trace.final:
            plan.skipped.append((name, "norm not inserted: output layer"))
        elif trace.norm_after is not None:
            plan.skipped.append((name, f"norm not inserted: already followed by norm {trace.norm_after!r}"))
        else:
            target = _target(name, trace, position, consumers)
            target_names = tuple(aliases.get(id(model.get_submodule(target)), [target]))
            following = _norm_following(model, target_names)
            if following is not None:  # inserted before: Sequential(layer or activation, norm)
                plan.skipped.append((name, f"norm not inserted: already followed by norm {following!r}"))
            else:
                site_aliases = (tuple(names), target_names)
                plan.sites.append(_plan_site(name, trace, kind, target, keep_bias, site_aliases))
    return plan


def _target(name: str, trace: LayerTrace, position: str, consumers: dict[str, list[str]]) -> str:
    """The module a site wraps: the layer (``"pre"``, or no activation module after it) or its activation module."""
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
        return trace.consumer
    return name


def _plan_site(
    name: str,
    trace: LayerTrace,
    kind: NormKind | None,
    target: str,
    keep_bias: bool,
    aliases: tuple[tuple[str, ...], tuple[str, ...]],
) -> _Site:
    layer, shape = trace.module, trace.output_shape
    channels_last = isinstance(layer, nn.Linear)
    if not channels_last and len(shape) != len(layer.kernel_size) + 2:
        raise ValueError(f"Cannot insert a norm after {name!r}: expected a batched output but got shape {shape}")
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
    return _Site(name, target, norm, "post" if target != name else "pre", shape, remove_bias, *aliases)


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

    Insertion is idempotent: a layer (``"pre"``) or activation module (``"post"``) that a norm already follows
    directly in an ``nn.Sequential`` (as in ``Sequential(m, norm)``, what an earlier insertion made) gets no second
    one and is listed in ``skipped`` ("already followed by norm ..."). A module shared under several names
    (``net.a = net.b = layer``) is wrapped once, and the same ``nn.Sequential(m, norm)`` is set under every name, so
    the aliases stay one module; ``exclude`` matching any of its names leaves it alone.

    Args:
        model: any ``nn.Module``.
        example_input: a Tensor, tuple of args or dict of kwargs; its batch size drives ``norm="auto"``.
        norm: ``"auto"``, a registered name, a norm class or a ``functools.partial`` (see :func:`get_norm_layer`).
        position: ``"pre"`` (between the layer and its activation) or ``"post"`` (after an activation module).
        exclude: a list or tuple of glob patterns on qualified layer names.
        keep_bias: keep biases a following BatchNorm makes redundant (True or False).

    Raises:
        ValueError: naming the layer and value: unknown norm, bad position, ``keep_bias`` not a bool, ``"post"`` after
            a functional or shared activation, a shape the kind cannot normalize (group count not dividing, rank too
            small), an example input that fails in ``forward``.
        TypeError: for a ``model`` that is no ``nn.Module`` or an ``exclude`` that is not a list of strings.

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> report = insert_norms(net, torch.randn(64, 8))
        >>> [type(m).__name__ for m in net[0]], net[0][0].bias is None
        (['Linear', 'BatchNorm1d'], True)
        >>> report.renamed_keys, report.removed_keys
        ({'0.weight': '0.0.weight'}, ['0.bias'])
        >>> insert_norms(net, torch.randn(64, 8)).skipped[0]
        ('0.0', "norm not inserted: already followed by norm '0.1'")
    """
    _check_model(model)
    _check_insert_arguments(norm, position, exclude, keep_bias)
    traces = trace_activations(model, example_input)
    return plan_insertions(model, example_input, traces, norm, position, exclude, keep_bias).apply(model)
