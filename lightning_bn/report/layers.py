"""The layers of a run: its layers table, their order, the std each is compared with, and zero-init detection."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from lightning_bn.tags import ACT_DEAD, ACT_SATURATION, ACT_STD, UPDATE_RATIO, WEIGHT_NORM

__all__: list[str] = []

#: how far from 1 the first logged update ratio of a weight may be for the weight to count as zero before that step
#: (``‖Δw‖ / ‖w‖`` is 1 when ``w`` was 0 before the step, whatever the optimizer; above 4096 elements the monitor
#: samples the weight and sums the two norms in float32 in different orders: a 10 x 4096 zero head reads 0.999997,
#: a 1e-6 tolerance missed it; a weight that was not 0 reads exactly 1 only by coincidence)
_ZERO_INIT_TOLERANCE = 1e-4


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
        norm, ratio = weight.get(WEIGHT_NORM, {}).get(first), weight.get(UPDATE_RATIO, {}).get(first)
        return norm == 0 or (ratio is not None and abs(ratio - 1) <= _ZERO_INIT_TOLERANCE)
    std = act.get(ACT_STD)
    if parameters or not std or not _is_norm(table.get(layer) if table is not None else None):
        return False  # with parameter figures, a norm without logged weights is frozen or has none: not deliberate
    return std[min(std)] == 0


def _left_zero(weight: Mapping[str, Mapping[int, float]]) -> int | None:
    """The first logged step after which a zero-initialized weight is no longer 0 (its update ratio there is 1)."""
    return min((step for step, norm in weight.get(WEIGHT_NORM, {}).items() if norm != 0), default=None)


def _kind(act: Mapping[str, Any]) -> str:
    if ACT_SATURATION in act or ACT_DEAD in act:
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
    type, else the kind (activation or not). The first layer of a module type (nothing of its type ran before it)
    and a layer missing from the table take the first layer of their kind; the first activation of a function is
    its own reference (ratio 1): activation functions run at scales their blocks set (a BatchNorm + ReLU decode
    head reads ~0.6 while the GELU of a 0.02-init encoder MLP reads ~1e-3: 242x, no explosion). Zero-initialized
    layers are references only where there is no other.
    """
    out: dict[str, tuple[dict[int, float], str]] = {}
    logged = [layer for layer in order if activations.get(layer, {}).get(ACT_STD)]
    kinds = {layer: ("kind", _kind(activations[layer])) for layer in logged}
    types = {layer: _std_type(layer, table) or kinds[layer] for layer in logged}
    references: dict[tuple[str, str], str] = {}
    for layer in sorted(logged, key=lambda layer: layer in zero_init):  # stable: other layers first, in order
        references.setdefault(types[layer], layer)
        references.setdefault(kinds[layer], layer)
    for layer in logged:
        std = activations[layer][ACT_STD]
        reference = references[types[layer]]
        if reference == layer and types[layer][0] != "activation":
            reference = references[kinds[layer]]
        ref_std = activations[reference][ACT_STD]
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
