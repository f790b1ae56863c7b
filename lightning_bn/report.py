"""Judge the health of a run from its logged monitor scalars: saturated, dead, non-finite, vanishing, exploding layers.

A pure function over ``{tag: [(step, value)]}`` (what :class:`ActivationMonitor` and :class:`GradientMonitor`
log) and, when the run has it, the table of watched layers that :class:`ActivationMonitor` writes as TensorBoard text
:data:`LAYERS_TAG` (forward order, module type, activation); testable without event files. ``lightning-bn report``
(:mod:`lightning_bn.cli`) reads the files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FLAGS", "LAYERS_TAG", "Flag", "LayerHealth", "RunHealth", "Thresholds", "analyze", "is_monitor_tag"]

#: Every problem the report can flag, in the order it lists them.
FLAGS = ("saturated", "dead", "nonfinite", "vanishing", "exploding")

_ACTIVATION_STATISTICS = frozenset(
    ["act_mean", "act_std", "act_min", "act_max", "act_zero", "act_saturation", "act_dead", "act_nonfinite"]
)
_PARAMETER_STATISTICS = frozenset(["grad_norm", "weight_norm", "update_ratio"])
_TOTAL_TAG = "grad_norm/total"
#: TensorBoard text tag of the watched layers, written by ActivationMonitor at step 0: a JSON list, in forward order,
#: of ``{"name", "module_type", "activation", "hook"}`` (the same as
#: ``lightning_bn.callbacks.activation_monitor.LAYERS_TAG``; this module imports nothing of the package).
LAYERS_TAG = "lightning_bn/layers"
#: how far from 1 the first logged update ratio of a weight may be for the weight to count as zero before that step
#: (``‖Δw‖ / ‖w‖`` is exactly 1 when ``w`` was 0 before the step, whatever the optimizer)
_ZERO_INIT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """When a layer is flagged, judged at every logged step.

    Args:
        max_saturation: ``saturated`` when ``act_saturation`` exceeds this. A ReLU sits near 0.5 by construction (its
            negative half has zero slope), so the default is well above that; a sigmoid net with N(0, 1) weights
            reaches ~0.8 (Glorot & Bengio 2010).
        max_dead: ``dead`` when more than this fraction of the units is saturated on every sample of the batch.
        min_std_ratio: ``vanishing`` when a layer's output std falls below this times the std of the first layer of
            the same type: with the run's layers table, the same module type (a LayerNorm with the first LayerNorm)
            or, for activations, the same activation function (a ReLU with the first ReLU); the first layer of each
            type, and every layer without the table, with the first layer of the same kind (activation outputs with
            activation outputs, other layers with other layers). Xavier under ReLU
            halves the variance per layer, so 30 layers end near 3e-5 (He et al. 2015). A deliberately
            zero-initialized layer (see :func:`analyze`) is judged only once its ratio has reached this.
        max_std_ratio: ``exploding`` when that ratio exceeds this.
        max_update_ratio: also ``exploding`` when one optimizer step moves a layer's parameters by more than this
            times their norm (``update_ratio``; ~1e-3 is healthy, a zero-initialized layer reads exactly 1 once).

    Example::

        >>> Thresholds(max_saturation=0.9).max_dead
        0.5
    """

    max_saturation: float = 0.7
    max_dead: float = 0.5
    min_std_ratio: float = 0.01
    max_std_ratio: float = 100.0
    max_update_ratio: float = 1.0


@dataclass
class Flag:
    """One problem of one layer: the first and last logged step where it held, and whether it holds at the end."""

    name: str
    first_step: int
    last_step: int
    active: bool
    reason: str

    def describe(self) -> str:
        """``"saturated since step 0"`` or, once cleared, ``"dead at steps 0-40 (cleared)"``."""
        if self.active:
            return f"{self.name} since step {self.first_step}"
        steps = f"step {self.first_step}" if self.first_step == self.last_step else f"steps {self.first_step}-"
        steps += "" if self.first_step == self.last_step else str(self.last_step)
        return f"{self.name} at {steps} (cleared)"

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("first_step", "last_step", "active", "reason")}


@dataclass
class LayerHealth:
    """The figures of one layer (``None`` where not logged) and its flags.

    ``kind`` is ``"activation"`` (has saturation), ``"layer"`` (other watched outputs: Linear, Conv, norms) or
    ``"parameters"`` (only gradients were logged). The gradient norm is the 2-norm over the layer's parameters; the
    update ratio is ``‖Δθ‖ / ‖θ‖`` over them. ``module_type`` comes from the layers table (``None`` without it);
    ``std_ratio`` is relative to the layer ``std_reference``; ``zero_init`` marks a deliberately zero-initialized
    layer (see :func:`analyze`).
    """

    name: str
    depth: int
    kind: str
    saturation: float | None = None
    worst_saturation: float | None = None
    dead: float | None = None
    worst_dead: float | None = None
    std: float | None = None
    std_ratio: float | None = None
    grad_norm: float | None = None
    update_ratio: float | None = None
    worst_update_ratio: float | None = None
    nonfinite: float | None = None
    worst_nonfinite: float | None = None
    nonfinite_gradient: bool = False
    flags: dict[str, Flag] = field(default_factory=dict)
    module_type: str | None = None
    std_reference: str | None = None
    zero_init: bool = False

    def to_dict(self) -> dict[str, Any]:
        figures = {
            "depth": self.depth,
            "kind": self.kind,
            "module_type": self.module_type,
            "zero_init": self.zero_init,
            "saturation": {"latest": self.saturation, "worst": self.worst_saturation},
            "dead": {"latest": self.dead, "worst": self.worst_dead},
            "std": self.std,
            "std_ratio": self.std_ratio,
            "std_reference": self.std_reference,
            "grad_norm": self.grad_norm,
            "update_ratio": {"latest": self.update_ratio, "worst": self.worst_update_ratio},
            "nonfinite": {"latest": self.nonfinite, "worst": self.worst_nonfinite, "gradient": self.nonfinite_gradient},
        }
        return {**figures, "flags": {name: flag.to_dict() for name, flag in self.flags.items()}}


@dataclass
class RunHealth:
    """The layers of one run in depth order, the logged steps, and per flag where it first appeared.

    ``forward_order``: the run logged its layers table, so the layers are in forward order (the order they first
    ran) and each ``std_ratio`` is relative to the first layer of the same module type or activation function.
    """

    name: str
    steps: list[int]
    layers: list[LayerHealth]
    forward_order: bool = False

    @property
    def zero_init(self) -> list[str]:
        """The deliberately zero-initialized layers, in depth order."""
        return [layer.name for layer in self.layers if layer.zero_init]

    @property
    def raised(self) -> set[str]:
        """Every flag raised on some layer."""
        return {name for layer in self.layers for name in layer.flags}

    def problems(self) -> dict[str, dict[str, Any]]:
        """Per raised flag: the first step, the shallowest layer flagged at that step, and every flagged layer."""
        out = {}
        for name in FLAGS:
            flagged = [layer for layer in self.layers if name in layer.flags]
            hits = [(layer.flags[name].first_step, layer.depth, layer.name) for layer in flagged]
            if hits:
                step, _, first = min(hits)
                out[name] = {"first_step": step, "first_layer": first, "layers": [hit[2] for hit in hits]}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "forward_order": self.forward_order,
            "layers": {layer.name: layer.to_dict() for layer in self.layers},
            "problems": self.problems(),
            "zero_init": self.zero_init,
        }


def is_monitor_tag(tag: str) -> bool:
    """Whether a scalar tag was written by a lightning-bn monitor.

    Example::

        >>> is_monitor_tag("act_std/net.0"), is_monitor_tag("grad_norm/total"), is_monitor_tag("train_loss")
        (True, True, False)
    """
    statistic, _, name = tag.partition("/")
    return bool(name) and statistic in _ACTIVATION_STATISTICS | _PARAMETER_STATISTICS


def analyze(
    scalars: Mapping[str, Sequence[tuple[int, float]]],
    name: str = "",
    thresholds: Thresholds = Thresholds(),
    layers: Sequence[Mapping[str, Any]] | None = None,
) -> RunHealth:
    """Flag the layers of one run from its logged scalars.

    With ``layers`` (the run's layers table, see :data:`LAYERS_TAG`) the layers come in its order, the forward order
    of the model, and each output std is compared with that of the first layer of the same module type (a LayerNorm
    with the first LayerNorm, a Linear with the first Linear) or, for activations, of the same activation function;
    the first layer of each type, which has nothing of its type before it, with the first layer of its kind.
    Without it, layers are kept in the order their tags first appear in ``scalars`` (the monitors log in forward or
    module registration order, unlike a natural sort that would put ``decoder`` before ``encoder``) and stds are
    compared within two kinds only: activation outputs and other layers. Either way a layer seen only through its
    parameters goes among its siblings by natural order (``net.2`` before ``net.10``), else after the layer logged
    before it. Each flag is evaluated at every logged step and kept with the first and last step where it held; it
    is *active* when it holds at the layer's latest logged step.

    A layer is *zero-initialized on purpose* (``zero_init``; e.g. the last norm of each residual branch under
    ``zero_init_residual``, so that every block starts as the identity) when its ``weight`` was exactly 0 at its first
    logged step: ``weight_norm/<layer>.weight`` reads 0 there, or ``update_ratio/<layer>.weight`` reads 1 (``‖Δw‖ =
    ‖w‖`` after a step from ``w = 0``); or, in a run without parameter figures, when the table says it is a norm
    layer and its output std is exactly 0 at its first logged step. Such a layer is not a reference for the others,
    is judged ``vanishing`` only once its std ratio has reached ``min_std_ratio`` (its small output is by design
    until it has learned), and its update ratio at that first step (always 1) is not judged.

    Args:
        scalars: tag -> ``[(step, value)]``, e.g. ``{"act_saturation/net.1": [(0, 0.93)]}``; other tags are ignored.
        name: the run's name.
        thresholds: when to flag.
        layers: the watched layers in forward order, ``{"name", "module_type", "activation", "hook"}`` each
            (entries without a string ``name`` are ignored); ``None`` for a run logged without the table.

    Returns:
        A :class:`RunHealth`; it has no layers when ``scalars`` holds no lightning-bn tag.

    Example::

        >>> run = analyze({"act_std/net.1": [(0, 0.9)], "act_saturation/net.1": [(0, 0.2), (5, 0.95)]})
        >>> layer = run.layers[0]
        >>> layer.saturation, layer.worst_saturation, layer.flags["saturated"].describe()
        (0.95, 0.95, 'saturated since step 5')
    """
    activations: dict[str, dict[str, dict[int, float]]] = {}
    parameters: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    for tag, series in scalars.items():
        if tag == _TOTAL_TAG or not is_monitor_tag(tag):
            continue
        statistic, _, target = tag.partition("/")
        values = {int(step): float(value) for step, value in series}
        if statistic in _ACTIVATION_STATISTICS:
            activations.setdefault(target, {})[statistic] = values
        else:
            module = target.rpartition(".")[0] or target
            parameters.setdefault(module, {}).setdefault(target, {})[statistic] = values
    table = _layer_table(layers)
    logged = list(activations)
    if table is not None:
        logged = _merge_orders([layer for layer in table if layer in activations], logged, siblings=False)
    order = _merge_orders(logged, list(parameters))
    zero_init = {layer for layer in order if _is_zero_init(layer, activations.get(layer, {}), parameters, table)}
    std_ratios = _std_ratios(order, activations, table, zero_init)
    out = []
    for depth, layer in enumerate(order):
        act, params = activations.get(layer, {}), parameters.get(layer, {})
        kind = _kind(act)
        grad = _per_step(params, _grad_norm)
        update = _per_step(params, _update_ratio)
        ratio, reference = std_ratios.get(layer, ({}, None))
        judged_ratio, judged_update = ratio, update
        if layer in zero_init:
            awake = [step for step, value in sorted(ratio.items()) if value >= thresholds.min_std_ratio]
            judged_ratio = {step: value for step, value in ratio.items() if awake and step >= awake[0]}
            left_zero = _left_zero(params.get(f"{layer}.weight", {}))  # the update from 0 reads 1: no judgement
            judged_update = {step: value for step, value in update.items() if left_zero is None or step > left_zero}
        out.append(
            LayerHealth(
                layer,
                depth,
                kind,
                saturation=_latest(act.get("act_saturation")),
                worst_saturation=_worst(act.get("act_saturation")),
                dead=_latest(act.get("act_dead")),
                worst_dead=_worst(act.get("act_dead")),
                std=_latest(act.get("act_std")),
                std_ratio=_latest(ratio),
                grad_norm=_latest(grad),
                update_ratio=_latest(update),
                worst_update_ratio=_worst(update),
                nonfinite=_latest(act.get("act_nonfinite")),
                worst_nonfinite=_worst(act.get("act_nonfinite")),
                nonfinite_gradient=any(not math.isfinite(v) for v in grad.values()),
                flags=_flags(act, grad, judged_update, ratio, judged_ratio, reference or "", thresholds),
                module_type=_module_type(table.get(layer) if table is not None else None),
                std_reference=reference,
                zero_init=layer in zero_init,
            )
        )
    steps = {s for layer in [*activations.values(), *parameters.values()] for s in _steps(layer)}
    return RunHealth(name, sorted(steps), out, forward_order=table is not None)


def _layer_table(layers: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]] | None:
    """The layers table by name, in its (forward) order; ``None`` without a table."""
    if layers is None:
        return None
    table: dict[str, Mapping[str, Any]] = {}
    for entry in layers:
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            table.setdefault(entry["name"], entry)
    return table


def _module_type(entry: Mapping[str, Any] | None) -> str | None:
    module_type = entry.get("module_type") if entry is not None else None
    return module_type if isinstance(module_type, str) else None


def _activation(entry: Mapping[str, Any] | None) -> str | None:
    """The activation function an entry's figures are the output of (``"gelu"`` for ``"gelu(approximate=tanh)"``)."""
    activation = entry.get("activation") if entry is not None else None
    return activation.partition("(")[0] if isinstance(activation, str) and activation else None


def _is_norm(entry: Mapping[str, Any] | None) -> bool:
    """A norm layer whose output is watched as is (not a norm-act layer's activation output)."""
    module_type = _module_type(entry)
    return module_type is not None and "Norm" in module_type and _activation(entry) is None


def _is_zero_init(
    layer: str,
    act: Mapping[str, Mapping[int, float]],
    parameters: Mapping[str, Mapping[str, Mapping[str, Mapping[int, float]]]],
    table: Mapping[str, Mapping[str, Any]] | None,
) -> bool:
    """Whether a layer was zero-initialized on purpose (see :func:`analyze`)."""
    weight = parameters.get(layer, {}).get(f"{layer}.weight")
    first = min(_steps(weight), default=None) if weight else None
    if first is not None:
        norm, ratio = weight.get("weight_norm", {}).get(first), weight.get("update_ratio", {}).get(first)
        return norm == 0 or (ratio is not None and abs(ratio - 1) <= _ZERO_INIT_TOLERANCE)
    std = act.get("act_std")
    if parameters or not std or not _is_norm(table.get(layer) if table is not None else None):
        return False  # with parameter figures, a norm without logged weights is frozen or has none: not deliberate
    return std[min(std)] == 0


def _left_zero(weight: Mapping[str, Mapping[int, float]]) -> int | None:
    """The first logged step after which a zero-initialized weight is no longer 0 (its update ratio there is 1)."""
    return min((step for step, norm in weight.get("weight_norm", {}).items() if norm != 0), default=None)


def _merge_orders(primary: list[str], secondary: list[str], siblings: bool = True) -> list[str]:
    """``primary``, with each name found only in ``secondary`` placed among its siblings (same parent module) by
    natural order (with ``siblings``), or else right after the name preceding it in ``secondary``."""
    merged = list(primary)
    cursor = -1
    for name in secondary:
        if name in merged:
            cursor = merged.index(name)
            continue
        parent = name.rpartition(".")[0]
        found = [i for i, other in enumerate(merged) if other.rpartition(".")[0] == parent] if siblings else []
        if found:
            later = [i for i in found if _natural_key(merged[i]) > _natural_key(name)]
            cursor = later[0] if later else found[-1] + 1
        else:
            cursor += 1
        merged.insert(cursor, name)
    return merged


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that puts ``net.2`` before ``net.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", name)]


def _kind(act: Mapping[str, Any]) -> str:
    if "act_saturation" in act or "act_dead" in act:
        return "activation"
    return "layer" if act else "parameters"


def _steps(series_by_name: Mapping[str, Any]) -> set[int]:
    """Every step in a (possibly nested) mapping of series."""
    out: set[int] = set()
    for series in series_by_name.values():
        if series and isinstance(next(iter(series.values())), Mapping):
            out |= _steps(series)
        else:
            out |= set(series)
    return out


def _std_ratios(
    order: list[str],
    activations: Mapping[str, Mapping[str, Mapping[int, float]]],
    table: Mapping[str, Mapping[str, Any]] | None,
    zero_init: Collection[str],
) -> dict[str, tuple[dict[int, float], str]]:
    """Per layer, its std over the std of its reference at each step, and the reference's name.

    The reference is the first layer of the same type: with a layers table the activation function or the module
    type, else the kind (activation or not). The first layer of a type (nothing of its type ran before it) and a
    layer missing from the table take the first layer of their kind. Zero-initialized layers are references only
    where there is no other.
    """
    out: dict[str, tuple[dict[int, float], str]] = {}
    logged = [layer for layer in order if activations.get(layer, {}).get("act_std")]
    kinds = {layer: ("kind", _kind(activations[layer])) for layer in logged}
    types = {layer: _std_type(layer, table) or kinds[layer] for layer in logged}
    references: dict[tuple[str, str], str] = {}
    for layer in sorted(logged, key=lambda layer: layer in zero_init):  # stable: other layers first, in order
        references.setdefault(types[layer], layer)
        references.setdefault(kinds[layer], layer)
    for layer in logged:
        std = activations[layer]["act_std"]
        reference = references[types[layer]]
        if reference == layer:
            reference = references[kinds[layer]]
        ref_std = activations[reference]["act_std"]
        # no ratio where the reference is silent (std 0); inf/NaN stds give NaN ratios, flagged as non-finite instead
        out[layer] = ({s: _divide(v, ref_std[s]) for s, v in std.items() if ref_std.get(s, 0.0) != 0}, reference)
    return out


def _std_type(layer: str, table: Mapping[str, Mapping[str, Any]] | None) -> tuple[str, str] | None:
    """What a layer's std is compared within, from the layers table: its activation function, else its module type."""
    entry = table.get(layer) if table is not None else None
    activation, module_type = _activation(entry), _module_type(entry)
    if activation is not None:
        return ("activation", activation)
    return ("module", module_type) if module_type is not None else None


def _divide(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) else math.nan


def _per_step(
    params: Mapping[str, Mapping[str, Mapping[int, float]]],
    combine: Callable[[list[Mapping[str, Mapping[int, float]]], int], float | None],
) -> dict[int, float]:
    out = {}
    for step in sorted(_steps(params)):
        value = combine(list(params.values()), step)
        if value is not None:
            out[step] = value
    return out


def _grad_norm(params: list[Mapping[str, Mapping[int, float]]], step: int) -> float | None:
    """The 2-norm over the layer's parameters (exact for the monitor's default 2-norms; inf/NaN propagate)."""
    norms = [p["grad_norm"][step] for p in params if step in p.get("grad_norm", {})]
    return math.sqrt(sum(n * n for n in norms)) if norms else None


def _update_ratio(params: list[Mapping[str, Mapping[int, float]]], step: int) -> float | None:
    """``‖Δθ‖ / ‖θ‖`` over the layer's parameters, from each one's logged ratio and weight norm."""
    delta_sq = weight_sq = 0.0
    found = False
    for p in params:
        ratio, weight = p.get("update_ratio", {}).get(step), p.get("weight_norm", {}).get(step)
        if ratio is None or weight is None or (math.isnan(ratio) and weight == 0):
            continue  # zero weights after the step: the ratio says nothing about the size of the update
        found = True
        delta_sq += (ratio * weight) ** 2
        weight_sq += weight**2
    if not found:
        return None
    return math.sqrt(delta_sq / weight_sq) if weight_sq else math.nan


def _latest(series: Mapping[int, float] | None) -> float | None:
    return series[max(series)] if series else None


def _worst(series: Mapping[int, float] | None) -> float | None:
    """The largest value; NaN only when every value is NaN."""
    if not series:
        return None
    finite = [v for v in series.values() if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _flags(
    act: Mapping[str, Mapping[int, float]],
    grad: Mapping[int, float],
    update: Mapping[int, float],
    std_ratio: Mapping[int, float],
    vanishing_ratio: Mapping[int, float],
    reference: str,
    thresholds: Thresholds,
) -> dict[str, Flag]:
    """Evaluate every condition at every logged step; keep the first and last step where each held.

    At a step where the layer's activations hold inf/NaN, only ``nonfinite`` is judged: its other figures are void.
    ``vanishing`` is judged on ``vanishing_ratio`` (the steps of ``std_ratio`` where it may hold).
    """
    t = thresholds
    nonfinite = act.get("act_nonfinite", {})
    void = {step for step, count in nonfinite.items() if count > 0}
    checks: list[tuple[str, Mapping[int, float], Callable[[float], bool], Callable[[float], str]]] = [
        ("saturated", act.get("act_saturation", {}), lambda v: v > t.max_saturation, "saturation {:.3g}".format),
        ("dead", act.get("act_dead", {}), lambda v: v > t.max_dead, "dead fraction {:.3g}".format),
        ("nonfinite", nonfinite, lambda v: v > 0, "{:.0f} non-finite activations".format),
        ("nonfinite", grad, lambda v: not math.isfinite(v), "gradient norm {}".format),
        ("vanishing", vanishing_ratio, lambda v: v < t.min_std_ratio, f"std {{:.3g}} x that of {reference}".format),
        ("exploding", std_ratio, lambda v: v > t.max_std_ratio, f"std {{:.3g}} x that of {reference}".format),
        ("exploding", update, lambda v: v > t.max_update_ratio, "update ratio {:.3g}".format),
    ]
    last_step = max(_steps({**act, "grad": grad, "update": update}), default=None)
    hits: dict[str, list[tuple[int, str]]] = {}
    for name, series, condition, reason in checks:
        judged = series.items() if name == "nonfinite" else [(s, v) for s, v in series.items() if s not in void]
        hits.setdefault(name, []).extend((step, reason(v)) for step, v in judged if condition(v))
    out = {}
    for name in FLAGS:
        found = sorted(hits.get(name, []))
        if found:
            out[name] = Flag(name, found[0][0], found[-1][0], found[-1][0] == last_step, found[0][1])
    return out
