"""Analyze a run: read the monitors' scalars, evaluate every flag at every logged step."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from lightning_bn.tags import (
    ACT_DEAD,
    ACT_NONFINITE,
    ACT_SAMPLES,
    ACT_SATURATION,
    ACT_STD,
    ACT_TRANSMISSION,
    ACTIVATION_STATISTICS,
    ATTENTION_STATISTICS,
    GRAD_NORM,
    GRAD_RMS_EPS,
    LOSS_TAG,
    OUTPUT_STATISTICS,
    TOTAL_GRADIENT_TAG,
    UPDATE_RATIO,
    WEIGHT_NORM,
    is_monitor_tag,
    layer_order,
)

from .health import FLAGS, Flag, LayerHealth, RunHealth, Thresholds
from .layers import (
    _activation,
    _is_zero_init,
    _kind,
    _layer_table,
    _left_zero,
    _module_type,
    _std_ratios,
    _steps,
)
from .reading import find_runs, read_run

__all__ = ["analyze", "analyze_runs"]

_ACTIVATION_STATISTICS = frozenset(ACTIVATION_STATISTICS.values())
_ATTENTION_STATISTICS = frozenset(ATTENTION_STATISTICS.values())
_OUTPUT_STATISTICS = frozenset(OUTPUT_STATISTICS.values())
ATTN_LOGIT_MAX, ATTN_ENTROPY, ATTN_ENTROPY_MIN = (
    ATTENTION_STATISTICS[k] for k in ("logit_max", "entropy", "entropy_min")
)
OUT_LOG_Z = OUTPUT_STATISTICS["log_z"]
#: a layer whose weight norm at its first logged step is below this times the median layer's started deliberately tiny
_TINY_START = 1e-2
#: optimizer steps after a zero or tiny weight starts to move during which its update ratio is not judged
_YOUNG_STEPS = 10


@overload
def analyze(
    scalars: str | os.PathLike[str],
    name: str = "",
    thresholds: Thresholds = ...,
    layers: Sequence[Mapping[str, Any]] | None = None,
) -> list[RunHealth]: ...


@overload
def analyze(
    scalars: Mapping[str, Sequence[tuple[int, float]]],
    name: str = "",
    thresholds: Thresholds = ...,
    layers: Sequence[Mapping[str, Any]] | None = None,
) -> RunHealth: ...


def analyze(
    scalars: Mapping[str, Sequence[tuple[int, float]]] | str | os.PathLike[str],
    name: str = "",
    thresholds: Thresholds = Thresholds(),  # noqa: B008  (frozen: immutable, as in its defining module)
    layers: Sequence[Mapping[str, Any]] | None = None,
) -> RunHealth | list[RunHealth]:
    """Flag the layers of one run from its logged scalars, or of every run under a log directory.

    Given a path (``analyze("lightning_logs")``: a directory of TensorBoard runs, or one event file), every run below
    it that holds lightning-bn scalars is read (with its layers table) and analyzed: a list of :class:`RunHealth`,
    each named by its path relative to the directory, sorted (``lightning-bn report`` prints the same). Raises
    ``FileNotFoundError`` naming the path when it does not exist.

    With ``layers`` (the run's layers table, see :data:`LAYERS_TAG`) the layers come in its order, the forward order
    of the model, and each output std is compared with that of the first layer of the same module type (a LayerNorm
    with the first LayerNorm, a Linear with the first Linear) or, for activations, of the same activation function;
    the first layer of each module type, which has nothing of its type before it, with the first layer of its kind;
    the first activation of each function with itself (a BatchNorm + ReLU head after a tiny GELU encoder is not
    exploding).
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
    until it has learned), and its update ratio at that first step (always 1) is not judged. A watched activation
    inside it (a norm-act layer's ``act`` child: timm's ``BatchNormAct2d`` under ``zero_init_last``) shares that
    grace: not a reference, and neither ``vanishing``, ``saturated`` nor ``dead`` until its std ratio has reached
    ``min_std_ratio``. ``dead`` is not judged at steps where the units were seen fewer than ``min_dead_samples``
    times (``act_samples``).

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
    if isinstance(scalars, (str, os.PathLike)):
        return analyze_runs(Path(scalars), thresholds)[0]
    activations: dict[str, dict[str, dict[int, float]]] = {}
    attention: dict[str, dict[str, dict[int, float]]] = {}  # attention rows: attn_* figures
    outputs: dict[str, dict[str, dict[int, float]]] = {}  # the output-logit row: out_* figures
    rows: dict[str, None] = {}  # the rows with figures of their own, in the order first logged
    parameters: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    loss = {int(step): float(value) for step, value in scalars.get(LOSS_TAG, ())}
    for tag, series in scalars.items():
        if tag in (TOTAL_GRADIENT_TAG, LOSS_TAG) or not is_monitor_tag(tag):
            continue
        statistic, _, target = tag.partition("/")
        values = _series(series)
        if statistic in _ACTIVATION_STATISTICS:
            activations.setdefault(target, {})[statistic] = values
            rows.setdefault(target)
        elif statistic in _ATTENTION_STATISTICS:
            attention.setdefault(target, {})[statistic] = values
            rows.setdefault(target)
        elif statistic in _OUTPUT_STATISTICS:
            outputs.setdefault(target, {})[statistic] = values
            rows.setdefault(target)
        else:
            module = target.rpartition(".")[0] or target
            parameters.setdefault(module, {}).setdefault(target, {})[statistic] = values
    table = _layer_table(layers)
    order = layer_order(rows, layers if table is not None else None, parameters)
    zero_init = {layer for layer in order if _is_zero_init(layer, activations.get(layer, {}), parameters, table)}
    # the activation inside a zero-initialized norm-act layer (timm's BatchNormAct2d under zero_init_last: the norm's
    # weight is 0, its `act` child is watched) outputs f(bias) until the norm has learned: it shares the norm's grace
    graced = {layer: norm for layer in order if _kind(activations.get(layer, {})) == "activation"
              for norm in zero_init if layer.startswith(f"{norm}.")}  # fmt: skip
    std_ratios = _std_ratios(order, activations, table, zero_init | set(graced))
    woken_by = {norm: layer for layer, norm in graced.items()}  # a norm-act's own output is not watched: its act's is
    grads = {layer: _layer_norm(parameters.get(layer, {}), GRAD_NORM) for layer in order}
    weight_norms = {layer: _layer_norm(parameters.get(layer, {}), WEIGHT_NORM) for layer in order}
    # the relative gradient ||g|| / ||w|| of each layer (what moves it, whatever its size), and per step where the
    # layers stand: layer gradient norms themselves differ by 1e-4..1e-6 between healthy layers of real models
    # (ConvNeXt, Swin, BERT), their relative gradients by less than 1e-2 (measured on the conformance zoo)
    relative: dict[str, dict[int, float]] = {
        layer: {
            step: value / weight_norms[layer][step]
            for step, value in grad.items()
            if math.isfinite(value) and weight_norms[layer].get(step, 0.0) > 0
        }
        for layer, grad in grads.items()
    }
    # layers whose weights start tiny next to the others' (LayerScale gains, init 1e-6): after their first optimizer
    # step ||dw|| / ||w|| reads ~1 whatever the learning rate, as for a zero init; that first step is not judged
    tiny_start: dict[str, int] = {}
    first_norms = {layer: min(series.items()) for layer, series in weight_norms.items() if series}
    if first_norms:
        typical = statistics.median(norm for _, norm in first_norms.values())
        tiny_start = {layer: step for layer, (step, norm) in first_norms.items() if 0 < norm < _TINY_START * typical}
    # while a deliberately zero-initialized layer is still 0 (e.g. the last norm of each residual branch), nothing
    # upstream of it in its branch gets a gradient, by design: gradients are not judged up to the step it leaves 0
    # and the layers beside it in its block (the branch it closes) get small gradients until its output has grown:
    # they are judged from the step its std ratio reaches min_std_ratio (as its own vanishing flag is)
    woken = [_left_zero(parameters.get(layer, {}).get(f"{layer}.weight", {})) for layer in zero_init]
    quiet_until = max((step for step in woken if step is not None), default=-1)
    gated: dict[str, float] = {}  # layer -> the step from which its gradient is judged
    for closing in zero_init:
        ratio = std_ratios.get(closing, std_ratios.get(woken_by.get(closing, ""), ({}, None)))[0]
        awake = min((step for step, value in ratio.items() if value >= thresholds.min_std_ratio), default=math.inf)
        block = closing.rpartition(".")[0]
        for layer in order:
            if layer != closing and block and layer.rpartition(".")[0] == block:
                gated[layer] = max(gated.get(layer, -1), awake if ratio else -1)
    # a branch scaled by a deliberately tiny gain (LayerScale 1e-6) gets gradients scaled by it, by design: its layers
    # (the gain module's own children, or its siblings) are not judged while the gain is still tiny
    tiny_gate: dict[str, set[int]] = {}
    for gain in tiny_start:
        tiny = {step for step, norm in weight_norms[gain].items() if norm < _TINY_START * typical}
        inside = [layer for layer in order if layer.startswith(f"{gain}.")]
        parent = gain.rpartition(".")[0]
        branch = inside or [layer for layer in order if layer != gain and layer.rpartition(".")[0] == parent]
        for layer in branch:
            tiny_gate.setdefault(layer, set()).update(tiny)

    def judged(layer: str, step: int) -> bool:
        return step > quiet_until and step >= gated.get(layer, -1) and step not in tiny_gate.get(layer, ())

    context = _gradient_context(
        order, relative, weight_norms, lambda layer, step: layer in zero_init or not judged(layer, step)
    )
    # a vanish of every layer at once (a loss scaled far down) shows in no comparison between layers; under an
    # Adam-type optimizer it shows against eps: judged where the median layer's per-element RMS gradient is below eps
    # (single parameters below it are common and harmless: a key projection at init, a LayerScale branch, a BN gain)
    eps_scales = {
        layer: {step: value for step, value in _per_step(parameters.get(layer, {}), _smallest(GRAD_RMS_EPS)).items()
                if judged(layer, step) and layer not in zero_init}  # gated by design: neither judged nor counted
        for layer in order
    }  # fmt: skip
    eps_by_step: dict[int, list[float]] = {}
    for series in eps_scales.values():
        for step, value in series.items():
            eps_by_step.setdefault(step, []).append(value)
    eps_median = {step: statistics.median(values) for step, values in eps_by_step.items()}
    out = []
    for depth, layer in enumerate(order):
        act, params = activations.get(layer, {}), parameters.get(layer, {})
        attn, out_logits = attention.get(layer, {}), outputs.get(layer, {})
        kind = _kind(act) if act else "attention" if attn else "output" if out_logits else "parameters"
        grad = grads[layer]
        update = _per_step(params, _update_ratio)
        weights = weight_norms[layer]
        ratio, reference = std_ratios.get(layer, ({}, None))
        judged_ratio, judged_update = ratio, update
        judged_act = act
        if layer in graced:  # its input is the norm's bias while the norm is 0: neither small nor flat by accident
            awake = [step for step, value in sorted(ratio.items()) if value >= thresholds.min_std_ratio]
            judged_ratio = {step: value for step, value in ratio.items() if awake and step >= awake[0]}
            judged_act = {statistic: {step: v for step, v in series.items() if awake and step >= awake[0]}
                          if statistic in (ACT_SATURATION, ACT_TRANSMISSION, ACT_DEAD) else series
                          for statistic, series in act.items()}  # fmt: skip
        if layer in zero_init:
            awake = [step for step, value in sorted(ratio.items()) if value >= thresholds.min_std_ratio]
            judged_ratio = {step: value for step, value in ratio.items() if awake and step >= awake[0]}
            # the update from 0 reads 1, and for a few steps more the weight is the sum of a few updates, which can
            # cancel (an update that reverses the last one reads > 1): not judged for _YOUNG_STEPS optimizer steps
            left_zero = _left_zero(params.get(f"{layer}.weight", {}))
            judged_update = {step: value for step, value in update.items()
                             if left_zero is None or step > left_zero + _YOUNG_STEPS}  # fmt: skip
        elif layer in tiny_start:  # a deliberately tiny init (LayerScale's 1e-6) moves by its own size at first
            judged_update = {step: value for step, value in update.items() if step > tiny_start[layer] + _YOUNG_STEPS}
        entry = table.get(layer) if table is not None else None
        healthy = entry.get("healthy_saturation") if entry is not None else None
        healthy = float(healthy) if isinstance(healthy, (int, float)) and math.isfinite(healthy) else None
        limit = thresholds.saturation_limit(healthy)
        gradient_share = {
            step: (value, relative[layer].get(step), weights.get(step), context.get(step))
            for step, value in grad.items()
            if math.isfinite(value) and judged(layer, step)
        }
        flags = _flags(
            judged_act,
            grad,
            judged_update,
            ratio,
            judged_ratio,
            reference or "",
            thresholds,
            limit,
            gradient_share,
            weights,
            layer,
            loss,
            {step: v for step, v in eps_scales[layer].items() if eps_median.get(step, math.inf) < 1},
        )
        flags.update(_attention_flags(attn, out_logits, thresholds))
        out.append(
            LayerHealth(
                layer,
                depth,
                kind,
                transmission=_latest(act.get(ACT_TRANSMISSION)),
                worst_transmission=_lowest(act.get(ACT_TRANSMISSION)),
                saturation=_latest(act.get(ACT_SATURATION)),
                worst_saturation=_worst(act.get(ACT_SATURATION)),
                dead=_latest(act.get(ACT_DEAD)),
                worst_dead=_worst(act.get(ACT_DEAD)),
                std=_latest(act.get(ACT_STD)),
                std_ratio=_latest(ratio),
                grad_norm=_latest(grad),
                update_ratio=_latest(update),
                worst_update_ratio=_worst(update),
                nonfinite=_latest(act.get(ACT_NONFINITE)),
                worst_nonfinite=_worst(act.get(ACT_NONFINITE)),
                nonfinite_gradient=any(not math.isfinite(v) for v in grad.values()),
                flags={name: flags[name] for name in FLAGS if name in flags},
                module_type=_module_type(entry),
                std_reference=reference,
                zero_init=layer in zero_init,
                activation=_activation(entry),
                healthy_saturation=healthy,
                saturation_limit=limit if ACT_SATURATION in act else None,
                logit_max=_latest(attn.get(ATTN_LOGIT_MAX)),
                worst_logit_max=_worst(attn.get(ATTN_LOGIT_MAX)),
                entropy=_latest(attn.get(ATTN_ENTROPY)),
                lowest_entropy=_lowest(attn.get(ATTN_ENTROPY)),
                entropy_min=_latest(attn.get(ATTN_ENTROPY_MIN)),
                log_z=_latest(out_logits.get(OUT_LOG_Z)),
                worst_log_z=_furthest(out_logits.get(OUT_LOG_Z)),
            )
        )
    figures = [*activations.values(), *attention.values(), *outputs.values(), *parameters.values()]
    steps = {s for layer in figures for s in _steps(layer)}
    unwatched = [e["name"] for e in (table or {}).values() if e.get("hook") == "unwatched"]
    return RunHealth(name, sorted(steps), out, forward_order=table is not None, unwatched=unwatched)


def analyze_runs(
    logdir: Path,
    thresholds: Thresholds = Thresholds(),  # noqa: B008  (frozen: immutable)
) -> tuple[list[RunHealth], list[str]]:
    """Every run below ``logdir`` (a directory of TensorBoard runs, or one event file), each read once and analyzed:
    the runs with lightning-bn scalars, and the names of those without (``lightning-bn report`` prints both).

    Raises:
        FileNotFoundError: naming ``logdir`` when it does not exist.
    """

    if not logdir.exists():
        raise FileNotFoundError(f"Expected a log directory or event file but {str(logdir)!r} does not exist")
    runs, skipped = [], []
    for run in find_runs(logdir):
        name = run.relative_to(logdir).as_posix() if run != logdir else "."
        scalars, layers = read_run(run)
        health = analyze(scalars, name, thresholds, layers)
        if health.layers:
            runs.append(health)
        else:
            skipped.append(name)
    return runs, skipped


def _series(series: Sequence[tuple[int, float]]) -> dict[int, float]:
    """``{int(step): float(value)}`` of a logged series (what :func:`read_run` gives: ints and floats, built in C)."""
    try:
        values = dict(series)
    except (TypeError, ValueError):
        values = None
    if values is not None and set(map(type, values)) <= {int} and set(map(type, values.values())) <= {float}:
        return values
    return {int(step): float(value) for step, value in series}


def _per_step(
    params: Mapping[str, Mapping[str, Mapping[int, float]]],
    combine: Callable[[list[Mapping[str, Mapping[int, float]]], int], float | None],
) -> dict[int, float]:
    out = {}
    series = list(params.values())
    for step in sorted(_steps(params)):
        value = combine(series, step)
        if value is not None:
            out[step] = value
    return out


def _layer_norm(params: Mapping[str, Mapping[str, Mapping[int, float]]], statistic: str) -> dict[int, float]:
    """Per step, the 2-norm over the layer's parameters of a per-parameter norm (``"grad_norm"``, ``"weight_norm"``;
    exact for the monitor's default 2-norms; inf/NaN propagate), in one pass over the series."""
    squares: dict[int, float] = {}
    for p in params.values():
        for step, n in p.get(statistic, {}).items():
            squares[step] = squares.get(step, 0) + n * n
    return {step: math.sqrt(squares[step]) for step in sorted(squares)}


def _smallest(statistic: str) -> Callable[[list[Mapping[str, Mapping[int, float]]], int], float | None]:
    """The smallest value over the layer's parameters of a per-parameter statistic (``None`` where none logged it)."""

    def combine(params: list[Mapping[str, Mapping[int, float]]], step: int) -> float | None:
        values = [p[statistic][step] for p in params if step in p.get(statistic, {})]
        return min(values) if values else None

    return combine


def _update_ratio(params: list[Mapping[str, Mapping[int, float]]], step: int) -> float | None:
    """``‖Δθ‖ / ‖θ‖`` over the layer's parameters, from each one's logged ratio and weight norm."""
    delta_sq = weight_sq = 0.0
    found = False
    for p in params:
        ratio, weight = p.get(UPDATE_RATIO, {}).get(step), p.get(WEIGHT_NORM, {}).get(step)
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


def _lowest(series: Mapping[int, float] | None) -> float | None:
    """The smallest value; NaN only when every value is NaN."""
    if not series:
        return None
    finite = [v for v in series.values() if not math.isnan(v)]
    return min(finite) if finite else math.nan


def _furthest(series: Mapping[int, float] | None) -> float | None:
    """The value furthest from 0; NaN only when every value is NaN."""
    if not series:
        return None
    finite = [v for v in series.values() if not math.isnan(v)]
    return max(finite, key=abs) if finite else math.nan


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
    saturation_limit: float,
    gradient_share: Mapping[int, tuple[float, float | None, float | None, _Gradients | None]],
    weights: Mapping[int, float],
    layer: str,
    loss: Mapping[int, float],
    eps_scale: Mapping[int, float],
) -> dict[str, Flag]:
    """Evaluate every condition at every logged step; keep the first and last step where each held.

    At a step where the layer's activations hold inf/NaN, only ``nonfinite`` is judged: its other figures are void.
    ``vanishing`` is judged on ``vanishing_ratio`` (the steps of ``std_ratio`` where it may hold);
    ``saturated`` against ``saturation_limit`` (the layer's kind's healthy saturation plus the margin);
    ``vanishing_gradient`` / ``exploding_gradient`` on ``gradient_share`` (per step: the layer's gradient norm, its
    relative gradient ``||g|| / ||w||``, its weight norm and where all layers stand, :class:`_Gradients`);
    ``stalled`` on runs of ``stalled_steps`` consecutive logged steps of
    ``update``.
    """
    t = thresholds
    nonfinite = act.get(ACT_NONFINITE, {})
    void = {step for step, count in nonfinite.items() if count > 0}

    def starved(value: tuple[float, float | None, float | None, _Gradients | None], step: int) -> bool:
        norm, rel, weight, ctx = value
        if norm == 0:
            return (weight or 0.0) > 0
        if rel is None or ctx is None or ctx.p90 <= 0:
            return False
        if ctx.median > 0 and rel < t.min_grad_ratio * ctx.median:
            return True
        return ctx.vanishing(t) and rel < t.trend_grad_ratio * ctx.p90

    def starved_reason(value: tuple[float, float | None, float | None, _Gradients | None]) -> str:
        norm, rel, weight, ctx = value
        if norm == 0 or rel is None or ctx is None or ctx.p90 <= 0:
            return f"gradient norm {norm:.3g} with non-zero weights"
        reason = f"gradient {rel:.2g} x its weights"
        if ctx.median > 0:
            reason += f", {rel / ctx.median:.2g} x the median layer's"
        if ctx.vanishing(t):
            reason += f", {rel / ctx.p90:.2g} x the top decile"
            reason += f"; over depth {ctx.describe()}"
        if weight is not None and ctx.median_weight > 0 and weight > t.max_weight_ratio * ctx.median_weight:
            reason += (f"; its weights are {weight / ctx.median_weight:.2g} x the median layer's: the weight scale, "
                       "not saturation, makes its relative gradient small")  # fmt: skip
        return reason

    def exploded(value: tuple[float, float | None, float | None, _Gradients | None], step: int) -> bool:
        _, rel, _, ctx = value
        return rel is not None and ctx is not None and ctx.exploding(t) and rel > ctx.p10 / t.trend_grad_ratio

    def exploded_reason(value: tuple[float, float | None, float | None, _Gradients | None]) -> str:
        _, rel, _, ctx = value
        return f"gradient {rel:.2g} x its weights, {rel / ctx.p10:.2g} x the bottom decile; over depth {ctx.describe()}"

    saturation = act.get(ACT_SATURATION, {})
    samples = act.get(ACT_SAMPLES, {})  # too few observations per unit: "dead" is chance (a run without it: judged)
    transmission = act.get(ACT_TRANSMISSION)
    if transmission:  # the flag rests on the gradient the layer passes back; act_saturation is shown beside it
        saturated = ("saturated", transmission, lambda v, s: v < t.min_transmission,
                     lambda v: f"transmission {v:.2g} < {t.min_transmission:.2g} of a healthy layer's gradient power"
                     + (f" (per-element saturation {saturation[max(saturation)]:.2f})" if saturation else ""))
    else:  # a run logged before act_transmission existed
        saturated = ("saturated", saturation, lambda v, s: v > saturation_limit,
                     lambda v: f"saturation {v:.3g} > {saturation_limit:.3g}")  # fmt: skip
    checks: list[tuple[str, Mapping[int, Any], Callable[[Any, int], bool], Callable[[Any], str]]] = [
        saturated,
        ("dead", {s: v for s, v in act.get(ACT_DEAD, {}).items() if samples.get(s, math.inf) >= t.min_dead_samples},
         lambda v, s: v > t.max_dead, "dead fraction {:.3g}".format),
        ("nonfinite", nonfinite, lambda v, s: v > 0, "{:.0f} non-finite activations".format),
        ("nonfinite", grad, lambda v, s: not math.isfinite(v), "gradient norm {}".format),
        ("vanishing", vanishing_ratio, lambda v, s: v < t.min_std_ratio, f"std {{:.3g}} x that of {reference}".format),
        ("exploding", std_ratio, lambda v, s: v > t.max_std_ratio, f"std {{:.3g}} x that of {reference}".format),
        ("exploding", update, lambda v, s: v > t.max_update_ratio, "update ratio {:.3g}".format),
        ("vanishing_gradient", gradient_share, starved, starved_reason),
        ("vanishing_gradient", eps_scale, lambda v, s: v < 1,
         lambda v: f"per-element RMS gradient {v:.2g} x its Adam eps, as for the median layer: the step divides by "
         "eps, not by the gradient's scale (every layer starved at once: check the loss scale, or lower eps)"),
        ("exploding_gradient", gradient_share, exploded, exploded_reason),
    ]  # fmt: skip
    last_step = max(_steps({**act, "grad": grad, "update": update}), default=None)
    hits: dict[str, list[tuple[int, str]]] = {}
    for name, series, condition, reason in checks:
        judged = series.items() if name == "nonfinite" else [(s, v) for s, v in series.items() if s not in void]
        hits.setdefault(name, []).extend((step, reason(v)) for step, v in judged if condition(v, step))
    hits["stalled"] = _stalled(update, loss, t)
    out = {}
    for name in FLAGS:
        found = sorted(hits.get(name, []))
        if found:
            out[name] = Flag(name, found[0][0], found[-1][0], found[-1][0] == last_step, found[0][1])
    return out


def _attention_flags(
    attn: Mapping[str, Mapping[int, float]], out: Mapping[str, Mapping[int, float]], t: Thresholds
) -> dict[str, Flag]:
    """The flags of an attention row (``attn_*`` figures) and of the output-logit row (``out_*``), each judged at
    every logged step of its figure (NaN steps are not judged; inf is beyond every bound); *active* when it holds at
    the figure's latest logged step. The starting values (entropy, log Z) are those at the figure's first logged step
    with a finite value: the caller passes the whole series, or (:class:`lightning_bn.HealthCheck`) a window with the
    first point kept."""
    hits: dict[str, list[tuple[int, str]]] = {}
    logits = sorted(attn.get(ATTN_LOGIT_MAX, {}).items())
    window = t.attention_logit_window
    # the bound flags a logit *rising past* it: a row already beyond it at its first logged step (an init whose
    # attention is one-hot from the start, e.g. unscaled N(0, 1) embeddings into nn.Transformer) is judged by growth
    first = next((v for _, v in logits if math.isfinite(v)), None)
    rises = first is not None and first <= t.max_attention_logit
    for i, (step, value) in enumerate(logits):
        if math.isnan(value):
            continue
        if value > t.max_attention_logit and rises:
            hits.setdefault("attention_logit_growth", []).append(
                (step, f"max attention logit {value:.3g} > {t.max_attention_logit:g}: the softmax is one-hot")
            )
            continue
        before = [(s, v) for s, v in logits[max(0, i - window) : i] if math.isfinite(v) and v > 0]
        if value <= t.attention_logit_floor or not before:
            continue
        low_step, low = min(before, key=lambda item: item[1])
        if value >= t.attention_logit_growth * low:
            reason = (
                f"max attention logit {value:.3g}, {value / low:.3g} x its {low:.3g} at step {low_step} (a growth of "
                f"{t.attention_logit_growth:g}x within {window} logged steps, beyond {t.attention_logit_floor:g})"
            )
            hits.setdefault("attention_logit_growth", []).append((step, reason))
    entropy = sorted((s, v) for s, v in attn.get(ATTN_ENTROPY, {}).items() if not math.isnan(v))
    start = next(((s, v) for s, v in entropy if math.isfinite(v)), None)
    if start is not None:
        start_step, first = start
        heads = attn.get(ATTN_ENTROPY_MIN, {})
        for step, value in entropy:
            if value < t.min_entropy_fraction * first and value < t.min_attention_entropy:
                reason = (
                    f"mean attention entropy {value:.3g} nats, {value / first:.2g} x its {first:.3g} at step "
                    f"{start_step} (< {t.min_entropy_fraction:g} x and < {t.min_attention_entropy:g} nats)"
                )
                if step in heads:
                    reason += f"; lowest head {heads[step]:.3g} nats"
                hits.setdefault("attention_entropy_collapse", []).append((step, reason))
    log_z = sorted((s, v) for s, v in out.get(OUT_LOG_Z, {}).items() if not math.isnan(v))
    start = next(((s, v) for s, v in log_z if math.isfinite(v)), None)
    if start is not None:
        start_step, first = start
        for step, value in log_z:
            if abs(value) > t.max_log_z and abs(value - first) > t.max_log_z_drift:
                reason = (
                    f"mean log Z {value:.3g}, {value - first:+.3g} from {first:.3g} at step {start_step} "
                    f"(|log Z| > {t.max_log_z:g}, moved > {t.max_log_z_drift:g})"
                )
                hits.setdefault("output_logit_divergence", []).append((step, reason))
    last = {"attention_logit_growth": max(attn.get(ATTN_LOGIT_MAX, {}), default=None),
            "attention_entropy_collapse": max(attn.get(ATTN_ENTROPY, {}), default=None),
            "output_logit_divergence": max(out.get(OUT_LOG_Z, {}), default=None)}  # fmt: skip
    return {
        name: Flag(name, found[0][0], found[-1][0], found[-1][0] == last[name], found[0][1])
        for name, found in hits.items()
    }


def _stalled(update: Mapping[int, float], loss: Mapping[int, float], t: Thresholds) -> list[tuple[int, str]]:
    """The steps inside runs of at least ``stalled_steps`` consecutive logged steps with ``update_ratio`` below
    ``min_update_ratio`` (NaN breaks a run) over which the training loss (when logged) did not improve: it fell by
    less than ``min_loss_improvement`` of itself and stayed above ``converged_loss`` (a converged net's updates are
    small because its gradients are, and rightly so)."""
    hits: list[tuple[int, str]] = []
    run: list[tuple[int, float]] = []
    for step, value in [*sorted(update.items()), (None, math.nan)]:
        if step is not None and value < t.min_update_ratio:
            run.append((step, value))
            continue
        if len(run) >= t.stalled_steps:
            worst = max(v for _, v in run)
            seen = [loss[s] for s, _ in run if s in loss and math.isfinite(loss[s])]
            reason = f"update ratio <= {worst:.2g} for {len(run)} logged steps"
            if len(seen) < 2:
                hits += [(s, f"{reason} (no training loss logged: converged, or starved?)") for s, _ in run]
            elif seen[0] - min(seen) < t.min_loss_improvement * abs(seen[0]) and min(seen) > t.converged_loss:
                hits += [(s, f"{reason} while the loss stayed at {seen[-1]:.3g}") for s, _ in run]
        run = []
    return hits


@dataclass(frozen=True)
class _Gradients:
    """Where the layers' relative gradients ``||g|| / ||w||`` stand at one step: the top decile, median and bottom
    decile, the median weight norm, and the fit of ``log10(||g|| / ||w||)`` against forward depth (decades per
    layer)."""

    p90: float
    median: float
    p10: float
    median_weight: float
    slope: float | None  # None: fewer than 3 layers
    layers: int

    @property
    def decades(self) -> float:
        """How many decades the fitted relative gradient spans over the stack."""
        return 0.0 if self.slope is None else abs(self.slope) * (self.layers - 1)

    @property
    def chi(self) -> float:
        """The estimated factor on gradient power per layer going back: ``10^(-2 slope)`` (< 1: vanishing)."""
        return math.nan if self.slope is None else 10.0 ** (-2.0 * self.slope)

    def vanishing(self, t: Thresholds) -> bool:
        return self.slope is not None and self.slope > 0 and self.decades > t.max_gradient_decades

    def exploding(self, t: Thresholds) -> bool:
        return self.slope is not None and self.slope < 0 and self.decades > t.max_gradient_decades

    def describe(self) -> str:
        way = "shrinks" if self.slope > 0 else "grows"
        return (f"the relative gradient {way} {self.decades:.1f} decades over {self.layers} layers, "
                f"gradient power x{self.chi:.2g} per layer going back (chi)")  # fmt: skip


def _quantile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _gradient_context(
    order: Sequence[str],
    relative: Mapping[str, Mapping[int, float]],
    weight_norms: Mapping[str, Mapping[int, float]],
    excluded: Callable[[str, int], bool],
) -> dict[int, _Gradients]:
    """Per logged step, :class:`_Gradients` over the layers with a relative gradient; the depth fit leaves out the
    layers ``excluded`` at that step (deliberately zero-initialized or gated by a tiny gain: small by design)."""
    steps = sorted({step for series in relative.values() for step in series})
    out = {}
    for step in steps:
        values = [(i, relative[layer][step]) for i, layer in enumerate(order) if step in relative.get(layer, {})]
        weights = [norms[step] for norms in weight_norms.values() if norms.get(step, 0.0) > 0]
        if not values:
            continue
        fitted = [(i, math.log10(v)) for i, v in values if v > 0 and not excluded(order[i], step)]
        slope = None
        if len(fitted) >= 3:
            depth = [rank for rank, _ in enumerate(fitted)]
            mean_x = sum(depth) / len(depth)
            mean_y = sum(y for _, y in fitted) / len(fitted)
            sxx = sum((x - mean_x) ** 2 for x in depth)
            slope = sum((x - mean_x) * (y - mean_y) for x, (_, y) in zip(depth, fitted)) / sxx
        rel = [v for _, v in values]
        out[step] = _Gradients(_quantile(rel, 0.9), statistics.median(rel), _quantile(rel, 0.1),
                               statistics.median(weights) if weights else 0.0, slope, len(fitted))  # fmt: skip
    return out
