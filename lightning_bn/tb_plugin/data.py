"""What the lightning-bn tab shows, as JSON-ready data: the runs under a log directory and, per run, its layers in
forward order (name, shortened name, module type, activation kind, the report's flags with the step each started)
and one layer x step matrix per figure. Pure Python over :mod:`lightning_bn.report`; no TensorBoard import."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_bn.report import analyze
from lightning_bn.report.reading import find_runs, read_run
from lightning_bn.tags import (
    ACT_DEAD,
    ACT_SATURATION,
    ACT_STD,
    ACT_TRANSMISSION,
    ACTIVATION_STATISTICS,
    GRAD_NORM,
    UPDATE_RATIO,
    WEIGHT_NORM,
    split_tag,
)

__all__ = ["FIGURES", "block_of", "list_runs", "run_data", "short_names"]

#: the strips of each row: key -> (label, colour scale); "log": log10 of the value, "unit": a fraction 0..1,
#: "transmission": 0..>=1 with 1 healthy, "kurtosis": log10 with 3 (a Gaussian's) marked
FIGURES: dict[str, tuple[str, str]] = {
    "std_ratio": ("std / first of its kind", "log"),
    "saturation": ("saturation", "unit"),
    "dead": ("dead fraction", "unit"),
    "grad_ratio": ("‖g‖ / ‖w‖", "log"),
    "transmission": ("gradient transmission", "transmission"),
    "update_ratio": ("update ratio", "log"),
    "kurtosis": ("kurtosis", "kurtosis"),
}


def list_runs(logdir: Path) -> list[str]:
    """The runs under ``logdir`` (directories holding event files), as paths relative to it (``"."`` for itself)."""
    logdir = Path(logdir)
    if not logdir.exists():
        return []
    return [run.relative_to(logdir).as_posix() if run != logdir else "." for run in find_runs(logdir)]


def resolve_run(logdir: Path, name: str) -> Path | None:
    """The directory of run ``name`` under ``logdir``, or ``None`` when it is not one of :func:`list_runs` (nothing
    outside the log directory is ever read)."""
    return Path(logdir) / name if name in list_runs(logdir) else None


def short_names(names: Sequence[str], longer_than: int = 24) -> list[str]:
    """``names`` without the dotted prefix common to all of them (never the middle of a name; at least the last part
    of each is kept), once one of them is longer than ``longer_than`` characters; else ``names`` as they are.

    Example::

        >>> short_names(["model.backbone.encoder.0.attn", "model.backbone.encoder.1.attn", "model.head"])
        ['backbone.encoder.0.attn', 'backbone.encoder.1.attn', 'head']
        >>> short_names(["net.0", "net.1"])
        ['net.0', 'net.1']
    """
    parts = [name.split(".") for name in names]
    if not parts or max(map(len, names)) <= longer_than:
        return list(names)
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def block_of(name: str) -> str | None:
    """The block ``name`` belongs to: its dotted prefix up to its first number that is not its last part (with the
    trailing dot), or ``None`` when it has none.

    Example::

        >>> block_of("bert.encoder.layer.3.attention.self.query")
        'bert.encoder.layer.3.'
        >>> block_of("net.3") is None
        True
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + "."
    return None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _matrix(order: Sequence[str], series: Mapping[str, Mapping[int, float]], steps: Sequence[int]) -> list[list[Any]]:
    return [[_finite(series.get(layer, {}).get(step)) for step in steps] for layer in order]


def run_data(run: Path, name: str = "") -> dict[str, Any]:
    """Everything the tab draws for one run: ``steps``, ``layers`` (forward order) and ``figures`` (per figure a
    layer x step matrix, ``null`` where nothing finite was logged)."""
    scalars, table = read_run(Path(run))
    health = analyze(scalars, name, layers=table)
    entries = {e["name"]: e for e in table or () if isinstance(e, Mapping)}
    order = [layer.name for layer in health.layers]
    steps = list(health.steps)

    per: dict[str, dict[str, dict[int, float]]] = {}  # statistic -> target -> step -> value
    for logged, values in scalars.items():
        statistic, target = split_tag(logged)
        per.setdefault(statistic, {})[target] = {int(step): float(value) for step, value in values}

    def layer_norm(statistic: str) -> dict[str, dict[int, float]]:
        """The 2-norm over each layer's parameters (``<layer>.weight``, ``<layer>.bias``) of a per-parameter norm."""
        squares: dict[str, dict[int, float]] = {}
        for target, values in per.get(statistic, {}).items():
            layer = target.rpartition(".")[0] or target
            acc = squares.setdefault(layer, {})
            for step, value in values.items():
                acc[step] = acc.get(step, 0.0) + value * value
        return {layer: {s: math.sqrt(v) for s, v in values.items()} for layer, values in squares.items()}

    grads, weights = layer_norm(GRAD_NORM), layer_norm(WEIGHT_NORM)
    grad_ratio = {
        layer: {s: g / weights[layer][s] for s, g in values.items() if weights.get(layer, {}).get(s, 0.0) > 0}
        for layer, values in grads.items()
    }
    update_ratio: dict[str, dict[int, float]] = {}  # the largest over each layer's parameters
    for target, values in per.get(UPDATE_RATIO, {}).items():
        acc = update_ratio.setdefault(target.rpartition(".")[0] or target, {})
        for step, value in values.items():
            acc[step] = max(acc.get(step, value), value)
    stds = per.get(ACT_STD, {})
    std_ratio: dict[str, dict[int, float]] = {}
    for layer in health.layers:
        reference = stds.get(layer.std_reference or layer.name, {})
        std_ratio[layer.name] = {
            s: v / reference[s] for s, v in stds.get(layer.name, {}).items() if reference.get(s, 0.0) != 0
        }
    matrices = {
        "std_ratio": std_ratio,
        "saturation": per.get(ACT_SATURATION, {}),
        "dead": per.get(ACT_DEAD, {}),
        "grad_ratio": grad_ratio,
        "transmission": per.get(ACT_TRANSMISSION, {}),
        "update_ratio": update_ratio,
        "kurtosis": per.get(ACTIVATION_STATISTICS["kurtosis"], {}),
    }
    shorts = short_names(order)
    layers = []
    for layer, short in zip(health.layers, shorts):
        entry = entries.get(layer.name, {})
        flags = [
            {
                "name": f.name,
                "first_step": f.first_step,
                "last_step": f.last_step,
                "active": f.active,
                "reason": f.reason,
            }
            for f in sorted(layer.flags.values(), key=lambda f: (f.first_step, f.name))
        ]
        layers.append(
            {
                "name": layer.name,
                "short": short,
                "depth": layer.depth,
                "group": block_of(layer.name),
                "kind": layer.kind,
                "module_type": layer.module_type or entry.get("module_type"),
                "activation": layer.activation or entry.get("activation"),
                "std_reference": layer.std_reference,
                "flags": flags,
                "first_flagged": min((f["first_step"] for f in flags), default=None),
            }
        )
    figures = {
        key: {"label": label, "scale": scale, "values": _matrix(order, matrices[key], steps)}
        for key, (label, scale) in FIGURES.items()
        if any(matrices[key].get(layer) for layer in order)
    }
    return {"run": name, "steps": steps, "forward_order": health.forward_order, "layers": layers, "figures": figures}
