"""What the lightning-bn tab shows, as JSON-ready data: the runs under a log directory and, per run, its layers in
forward order (name, shortened name, module type, activation kind, the report's flags with the step each started)
and one layer x step matrix per figure. Python and numpy over :mod:`lightning_bn.report`; no TensorBoard import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_bn.report import analyze
from lightning_bn.report.reading import find_runs, read_run
from lightning_bn.tags import (
    ACT_DEAD,
    ACT_SATURATION,
    ACT_STD,
    ACT_TRANSMISSION,
    ACTIVATION_STATISTICS,
    ATTENTION_STATISTICS,
    GRAD_NORM,
    OUTPUT_STATISTICS,
    UPDATE_RATIO,
    WEIGHT_NORM,
    split_tag,
)

__all__ = ["FIGURES", "block_of", "list_runs", "run_data", "short_names"]

#: the strips of each row: key -> (label, colour scale); "log": log10 of the value, "unit": a fraction 0..1,
#: "transmission": 0..>=1 with 1 healthy, "kurtosis": log10 with 3 (a Gaussian's) marked, "logit": log10 1..1000
#: with the report's bound on the max attention logit (100) marked, "retained": a fraction of the row's starting
#: value 0..>=1 with the collapse fraction (0.1) marked, "signed": -40..40 with 0 healthy (the output log Z).
#: Attention rows have the attention strips only, the output-logit row log Z; the other strips are blank there.
FIGURES: dict[str, tuple[str, str]] = {
    "std_ratio": ("std / first of its kind", "log"),
    "saturation": ("saturation", "unit"),
    "dead": ("dead fraction", "unit"),
    "grad_ratio": ("‖g‖ / ‖w‖", "log"),
    "transmission": ("gradient transmission", "transmission"),
    "update_ratio": ("update ratio", "log"),
    "kurtosis": ("kurtosis", "kurtosis"),
    "attn_logit_max": ("max attention logit", "logit"),
    "attn_entropy": ("attention entropy / at start", "retained"),
    "out_log_z": ("output log Z", "signed"),
}

_ATTN_LOGIT_MAX, _ATTN_ENTROPY = ATTENTION_STATISTICS["logit_max"], ATTENTION_STATISTICS["entropy"]
_OUT_LOG_Z = OUTPUT_STATISTICS["log_z"]


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


#: significant digits of the values sent to the tab (a strip colours a cell, a tooltip shows 3 digits)
DIGITS = 4


class _Series:
    """Per target (layer or parameter) of one statistic, its values over the run's steps as one row: ``values``
    (float64, 0 where not logged) and ``logged`` (bool); a step logged twice keeps its last value."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = np.asarray(steps, dtype=np.int64)
        self.rows: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # statistic -> target -> row

    def add(self, statistic: str, target: str, series: Sequence[tuple[int, float]]) -> None:
        values = np.zeros(len(self.steps))
        logged = np.zeros(len(self.steps), dtype=bool)
        last = dict(series)  # a step logged twice (a resumed run): its last value
        if last:
            at = np.fromiter(last.keys(), dtype=np.float64, count=len(last)).astype(np.int64)
            cells = np.fromiter(last.values(), dtype=np.float64, count=len(last))
            columns = np.minimum(np.searchsorted(self.steps, at), max(len(self.steps) - 1, 0))
            if len(self.steps) == 0 or not np.array_equal(self.steps[columns], at):  # a step the tab does not show
                inside = len(self.steps) > 0 and self.steps[columns] == at
                cells, columns = cells[inside], columns[inside]
            values[columns] = cells
            logged[columns] = True
        self.rows.setdefault(statistic, {})[target] = (values, logged)

    def of(self, statistic: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.rows.get(statistic, {})


def _layer_norms(params: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 2-norm over each layer's parameters (``<layer>.weight``, ``<layer>.bias``) of a per-parameter norm, the
    squares summed in the parameters' logged order."""
    squares: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for target, (values, logged) in params.items():
        layer = target.rpartition(".")[0] or target
        acc, seen = squares.get(layer, (np.zeros(len(values)), np.zeros(len(values), dtype=bool)))
        squares[layer] = (np.where(logged, acc + values * values, acc), seen | logged)
    return {layer: (np.sqrt(acc), seen) for layer, (acc, seen) in squares.items()}


def _largest(params: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The largest value over each layer's parameters (the first of equals; a NaN first met stays, as in ``max``)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for target, (values, logged) in params.items():
        layer = target.rpartition(".")[0] or target
        if layer not in out:
            out[layer] = (np.where(logged, values, 0.0), logged.copy())
            continue
        acc, seen = out[layer]
        take = logged & (~seen | (values > acc))
        out[layer] = (np.where(take, values, acc), seen | logged)
    return out


def _of_start(values: np.ndarray, logged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A row over its value at its first logged step with a finite, non-zero value (what the report compares the
    attention entropy with); nothing shown before that step or without one."""
    usable = logged & np.isfinite(values) & (values != 0)
    if not usable.any():
        return values, np.zeros_like(logged)
    first = int(np.argmax(usable))
    with np.errstate(divide="ignore", invalid="ignore"):
        return values / values[first], logged & (np.arange(len(values)) >= first)


def _rounded(values: np.ndarray, shown: np.ndarray) -> list[Any]:
    """``values`` to :data:`DIGITS` significant digits (the double nearest the rounded decimal, so that JSON writes
    it short), ``None`` where not ``shown`` or not finite."""
    shown = shown & np.isfinite(values)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        digits = DIGITS - 1 - np.floor(np.log10(np.abs(np.where(shown & (values != 0), values, 1.0))))
        digits = np.clip(digits, -300, 300)
        up, down = 10.0 ** np.maximum(digits, 0), 10.0 ** np.maximum(-digits, 0)  # exact powers of ten up to 1e22
        rounded = np.where(digits >= 0, np.round(values * up) / up, np.round(values / down) * down)
        rounded = np.where(np.isfinite(rounded) & (np.abs(digits) <= 22), rounded, values)
    out = rounded.tolist()
    for i in np.flatnonzero(~shown).tolist():
        out[i] = None
    return out


def run_data(run: Path, name: str = "") -> dict[str, Any]:
    """Everything the tab draws for one run: ``steps``, ``layers`` (forward order) and ``figures`` (per figure a
    layer x step matrix of values to :data:`DIGITS` significant digits, ``null`` where nothing finite was logged)."""
    scalars, table = read_run(Path(run))
    health = analyze(scalars, name, layers=table)
    entries = {e["name"]: e for e in table or () if isinstance(e, Mapping)}
    order = [layer.name for layer in health.layers]
    steps = list(health.steps)

    wanted = {ACT_STD, ACT_SATURATION, ACT_DEAD, ACT_TRANSMISSION, ACTIVATION_STATISTICS["kurtosis"]}
    wanted |= {GRAD_NORM, WEIGHT_NORM, UPDATE_RATIO, _ATTN_LOGIT_MAX, _ATTN_ENTROPY, _OUT_LOG_Z}
    per = _Series(steps)
    for logged, values in scalars.items():
        statistic, target = split_tag(logged)
        if statistic in wanted:
            per.add(statistic, target, values)

    grads, weights = _layer_norms(per.of(GRAD_NORM)), _layer_norms(per.of(WEIGHT_NORM))
    grad_ratio = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for layer, (g, g_logged) in grads.items():
            w, w_logged = weights.get(layer, (None, None))
            if w is not None:
                grad_ratio[layer] = (g / np.where(w > 0, w, 1.0), g_logged & w_logged & (w > 0))
        stds = per.of(ACT_STD)
        std_ratio = {}
        for layer in health.layers:
            if layer.name not in stds:
                continue
            std, std_logged = stds[layer.name]
            ref, ref_logged = stds.get(layer.std_reference or layer.name, (None, None))
            if ref is not None:
                std_ratio[layer.name] = (std / np.where(ref != 0, ref, 1.0), std_logged & ref_logged & (ref != 0))
    matrices = {
        "attn_logit_max": per.of(_ATTN_LOGIT_MAX),
        "attn_entropy": {layer: _of_start(*row) for layer, row in per.of(_ATTN_ENTROPY).items()},
        "out_log_z": per.of(_OUT_LOG_Z),
        "std_ratio": std_ratio,
        "saturation": per.of(ACT_SATURATION),
        "dead": per.of(ACT_DEAD),
        "grad_ratio": grad_ratio,
        "transmission": per.of(ACT_TRANSMISSION),
        "update_ratio": _largest(per.of(UPDATE_RATIO)),
        "kurtosis": per.of(ACTIVATION_STATISTICS["kurtosis"]),
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
                "group_label": block_of(short),  # the block as the rows show it (the common prefix dropped)
                "kind": layer.kind,
                "module_type": layer.module_type or entry.get("module_type"),
                "activation": layer.activation or entry.get("activation"),
                "std_reference": layer.std_reference,
                "flags": flags,
                "first_flagged": min((f["first_step"] for f in flags), default=None),
            }
        )
    nothing = [None] * len(steps)
    figures = {
        key: {
            "label": label,
            "scale": scale,
            "values": [_rounded(*matrices[key][layer]) if layer in matrices[key] else list(nothing) for layer in order],
        }
        for key, (label, scale) in FIGURES.items()
        if any(layer in matrices[key] and matrices[key][layer][1].any() for layer in order)
    }
    return {"run": name, "steps": steps, "forward_order": health.forward_order, "layers": layers, "figures": figures}
