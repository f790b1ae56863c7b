"""The report as text: a diagnosis per run (flagged layers, healthy layers folded by type, advice per flag), as an
aligned table or Markdown. Used by ``lightning-bn report`` and by :class:`lightning_bn.HealthCheck` at fit end."""

from __future__ import annotations

import math
from typing import Any

from .health import ADVICE, RunHealth, Thresholds

__all__ = ["RULES_POINTER", "format_markdown", "format_rules", "format_table", "printable"]

#: the note, in the flags column and under the problems, on a layer zero-initialized on purpose (no flag, no failure)
_ZERO_INIT_NOTE = "zero-init (deliberate)"
_COLUMNS = (
    "layer",
    "type",
    "transm.",
    "saturation",
    "worst sat.",
    "dead",
    "worst dead",
    "std",
    "std/first",
    "grad norm",
    "update ratio",
    "nonfinite",
    "flags",
)
#: the columns of the attention and output-logit figures: (column, LayerHealth attribute, format), shown before
#: ``flags`` in the runs that logged them
_ATTENTION_COLUMNS = (
    ("max logit", "logit_max", ".3g"),
    ("entropy", "entropy", ".3g"),
    ("log Z", "log_z", ".3g"),
)


def _columns(run: RunHealth) -> tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]:
    """The columns of a run's table: the figures columns of every run, then those of the attention and output-logit
    figures the run logged (none in a run without them: its table is as before), then ``flags``."""
    extra = tuple(c for c in _ATTENTION_COLUMNS if any(getattr(layer, c[1]) is not None for layer in run.layers))
    return (*_COLUMNS[:-1], *(c[0] for c in extra), _COLUMNS[-1]), extra


def format_table(runs: list[RunHealth], skipped: list[str], thresholds: Thresholds, every_layer: bool = False) -> str:
    """Per run, a diagnosis: the flagged layers in forward order with the step each problem started (every layer with
    ``every_layer``), the healthy layers folded into one line per layer type, and one line of advice per flag."""
    blocks: list[str] = []
    for run in runs:
        shown = run.layers if every_layer else [layer for layer in run.layers if layer.flags]
        lines = [f"run {run.name}: {_steps(run)}"]
        columns, extra = _columns(run)
        if shown:
            rows = [columns, *(tuple(map(printable, _row(layer, extra))) for layer in shown)]
            widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
            lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        if not every_layer:
            lines += _healthy(run, "  ", "    ")
        blocks.append("\n".join(map(printable, [*lines, *_problems(run, "  ")])))
    if skipped:
        blocks.append(printable(f"skipped (no lightning-bn scalars): {', '.join(skipped)}"))
    return "\n\n".join([*blocks, RULES_POINTER])


def format_markdown(
    runs: list[RunHealth], skipped: list[str], thresholds: Thresholds, every_layer: bool = False
) -> str:
    """A section per run: a pipe table of the flagged layers (every layer with ``every_layer``), the healthy layers
    by type, and the problems with advice."""
    blocks: list[str] = []
    for run in runs:
        shown = run.layers if every_layer else [layer for layer in run.layers if layer.flags]
        columns, extra = _columns(run)
        header = "| " + " | ".join(columns) + " |"
        rule = "|" + "|".join("---" for _ in columns) + "|"
        cells = [[printable(cell).replace("|", "\\|") for cell in _row(layer, extra)] for layer in shown]
        rows = ["| " + " | ".join(row) + " |" for row in cells]
        table = [header, rule, *rows, ""] if shown else []
        healthy = [] if every_layer else [*_healthy(run, "- ", "  - "), ""]
        blocks.append("\n".join(map(printable, [f"### `{run.name}`", "", _steps(run), "", *table, *healthy])))
        blocks.append("\n".join(map(printable, _problems(run, "- "))))
    if skipped:
        blocks.append(printable(f"Skipped (no lightning-bn scalars): {', '.join(f'`{name}`' for name in skipped)}"))
    return "\n\n".join([*blocks, RULES_POINTER])


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on escaped (``\\x1b``, ``\\n``, ``\\u202e``): names read
    from event files (layers, types, runs) cannot clear the screen, move the cursor or forge a line of the report.

    Example::

        >>> printable("net.1\\x1b[2J\\nrun x: no problems")
        'net.1\\\\x1b[2J\\\\nrun x: no problems'
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


#: the one line after every report (``format_rules`` / ``lightning-bn report --rules`` prints the rules themselves)
RULES_POINTER = "rules behind each flag: lightning-bn report --rules"


def format_rules(t: Thresholds) -> str:
    """The rules of every flag with the thresholds ``t``, one line per flag (``lightning-bn report --rules``).

    Example::

        >>> print(format_rules(Thresholds()).splitlines()[2])
          dead: dead fraction > 0.5
    """
    saturation = (
        f"saturation > {t.max_saturation:g}"
        if t.max_saturation is not None
        else f"saturation > the kind's healthy saturation at a N(0, 1) input + {t.saturation_margin:g}"
    )
    return "\n".join(
        [
            "rules (each threshold is an option of lightning-bn report, a field of lightning_bn.report.Thresholds):",
            f"  saturated: gradient transmission < {t.min_transmission:g} of a healthy layer's; in runs without "
            f"it, {saturation}",
            f"  dead: dead fraction > {t.max_dead:g}",
            "  nonfinite: inf/NaN activation or gradient",
            f"  vanishing / exploding: std/first < {t.min_std_ratio:g} / > {t.max_std_ratio:g} (first = the first "
            f"layer of the same type); exploding also: update ratio > {t.max_update_ratio:g}",
            f"  vanishing_gradient: ||g||/||w|| < {t.min_grad_ratio:g} x the median layer's, a gradient of 0 with "
            f"non-zero weights, or over {t.max_gradient_decades:g} decades of ||g||/||w|| along depth: "
            f"< {t.trend_grad_ratio:g} x the top decile",
            "  exploding_gradient: the same depth rule, growing towards the input",
            f"  stalled: update ratio < {t.min_update_ratio:g} for {t.stalled_steps} logged steps in a row while the "
            f"loss does not improve by {t.min_loss_improvement:g} and stays above {t.converged_loss:g}",
            "  attention_logit_growth: (attention rows) max attention logit rising past "
            f"{t.max_attention_logit:g}, or > "
            f"{t.attention_logit_floor:g} and >= {t.attention_logit_growth:g} x its smallest over the "
            f"{t.attention_logit_window} logged steps before",
            f"  attention_entropy_collapse: (attention rows) mean attention entropy < {t.min_entropy_fraction:g} x "
            f"its value at the first logged step and < {t.min_attention_entropy:g} nats",
            f"  output_logit_divergence: (output-logit row) |mean log Z| > {t.max_log_z:g} and moved more than "
            f"{t.max_log_z_drift:g} from its value at the first logged step",
            f"  {_ZERO_INIT_NOTE} (no flag): weights (or a norm's output) exactly 0 at the first logged step, not "
            f"flagged vanishing until std/first reaches {t.min_std_ratio:g}",
        ]
    )


def _healthy(run: RunHealth, bullet: str, nested: str) -> list[str]:
    """One line per layer type of the layers without flags (each under ``nested``, a Markdown sub-item where
    ``bullet`` is one): how many, and the range of their latest figures."""
    groups: dict[str, list[Any]] = {}
    for layer in run.layers:
        if not layer.flags:
            groups.setdefault(layer.layer_type, []).append(layer)
    if not groups:
        return []
    lines = [f"{bullet}healthy layers ({sum(map(len, groups.values()))}; --all lists them):"]
    for layer_type, layers in groups.items():
        figures = [
            f"{label} {_span([getattr(layer, attribute) for layer in layers], spec)}"
            for label, attribute, spec in (
                ("transmission", "transmission", ".2g"),
                ("saturation", "saturation", ".2f"),
                ("dead", "dead", ".2f"),
                ("std", "std", ".3g"),
                ("grad norm", "grad_norm", ".2g"),
                ("update ratio", "update_ratio", ".2g"),
                ("max logit", "logit_max", ".3g"),
                ("entropy", "entropy", ".3g"),
                ("log Z", "log_z", ".3g"),
            )
            if any(getattr(layer, attribute) is not None for layer in layers)
        ]
        count = f"{len(layers)} layer{'s' * (len(layers) != 1)}"
        lines.append(f"{nested}{layer_type}: {count}" + (f", {', '.join(figures)}" if figures else ""))
    return lines


def _span(values: list[float | None], spec: str) -> str:
    found = sorted(v for v in values if v is not None and math.isfinite(v))
    if not found:
        return "-"
    low, high = format(found[0], spec), format(found[-1], spec)
    return low if low == high else f"{low}..{high}"


def _steps(run: RunHealth) -> str:
    if not run.steps:
        return "no steps"
    order = ", layers in forward order" if run.forward_order else ""
    if run.unwatched:
        order += f"; {len(run.unwatched)} activation(s) not watched: {', '.join(run.unwatched)}"
    return (
        f"{len(run.steps)} logged steps ({run.steps[0]}-{run.steps[-1]}), latest figures at step {run.steps[-1]}{order}"
    )


def _row(layer: Any, extra: tuple[tuple[str, str, str], ...] = ()) -> tuple[str, ...]:
    nonfinite = _number(layer.worst_nonfinite, ".0f")
    if layer.nonfinite_gradient:
        nonfinite = "grad" if layer.worst_nonfinite is None else f"{nonfinite}+grad"
    return (
        layer.name,
        layer.layer_type,
        _number(layer.transmission, ".2g"),
        _number(layer.saturation, ".2f"),
        _number(layer.worst_saturation, ".2f"),
        _number(layer.dead, ".2f"),
        _number(layer.worst_dead, ".2f"),
        _number(layer.std, ".3g"),
        _number(layer.std_ratio, ".3g"),
        _number(layer.grad_norm, ".3g"),
        _number(layer.update_ratio, ".2g"),
        nonfinite,
        *(_number(getattr(layer, attribute), spec) for _, attribute, spec in extra),
        ", ".join([flag.describe() for flag in layer.flags.values()] + [_ZERO_INIT_NOTE] * layer.zero_init) or "-",
    )


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else str(value)


def _problems(run: RunHealth, bullet: str) -> list[str]:
    problems = run.problems()
    lines = [] if problems else [f"{bullet}no problems"]
    for flag, found in problems.items():
        first = next(layer for layer in run.layers if layer.name == found["first_layer"])
        count = len(found["layers"])
        lines.append(
            f"{bullet}{flag}: {count} layer{'s' * (count != 1)}, first at step {found['first_step']} in "
            f"{found['first_layer']} ({first.flags[flag].reason}); try: {ADVICE[flag]}"
        )
    if run.zero_init:
        count = len(run.zero_init)
        lines.append(f"{bullet}{_ZERO_INIT_NOTE}: {count} layer{'s' * (count != 1)}: {', '.join(run.zero_init)}")
    return lines
