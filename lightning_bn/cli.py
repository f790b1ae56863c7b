"""`lightning-bn` command line: ``lightning-bn report LOGDIR`` reads the monitors' TensorBoard logs back and prints,
per run and per layer, saturation, dead units, activation std across depth, gradient norm, update ratio and non-finite
counts, flagging saturated, dead, non-finite, vanishing and exploding layers with the step each problem started. Where
``ActivationMonitor`` logged its layers table (TensorBoard text ``lightning_bn/layers``), layers come in forward order
and each std is compared with the first layer of the same module type or activation; deliberately zero-initialized
layers are marked ``zero-init (deliberate)`` rather than flagged vanishing.

Exit status of ``report``: 0 done (no ``--fail-on`` flag raised), 1 a ``--fail-on`` flag was raised, 2 a usage error
or no lightning-bn logs under LOGDIR.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import lightning_bn
from lightning_bn.report import FLAGS, RunHealth, Thresholds, analyze
from lightning_bn.report.reading import (
    _EVENT_GLOB,
    _event_files,
    _layers,
    _load,
    _scalars,
    damage,
    find_runs,
    read_layers,
    read_scalars,
)

__all__ = ["EXIT_FLAGGED", "EXIT_NO_LOGS", "EXIT_OK", "find_runs", "main", "read_layers", "read_scalars"]

EXIT_OK = 0
#: a flag named by ``--fail-on`` was raised in some run
EXIT_FLAGGED = 1
#: LOGDIR is missing or holds no lightning-bn scalars (argparse also exits 2 on a usage error)
EXIT_NO_LOGS = 2

#: the note, in the flags column and under the problems, on a layer zero-initialized on purpose (no flag, no failure)
_ZERO_INIT_NOTE = "zero-init (deliberate)"
_COLUMNS = (
    "layer",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-bn`` console script; returns the exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Example::

        >>> main(["report", "no/such/dir"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "report":
        parser.print_help(sys.stderr)
        return EXIT_NO_LOGS
    return report(args.logdir, args.format, args.fail_on, _thresholds(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-bn`` and its ``report`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-bn", description="Weight initialization and normalization for PyTorch Lightning."
    )
    parser.add_argument("--version", action="version", version=f"lightning-bn {lightning_bn.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    defaults = Thresholds()
    rep = commands.add_parser(
        "report",
        help="print the health of every layer logged by ActivationMonitor / GradientMonitor",
        description="Read the TensorBoard event files under LOGDIR (every run / version inside, reported separately) "
        "and print per layer: latest and worst saturation and dead fraction, output std and its ratio to the first "
        "layer of the same type, gradient norm, update ratio, non-finite counts, and the flags raised with the "
        "step where each problem first appeared. Layers come in forward order where the run logged its layers "
        "table. Exit status: 0 done, 1 a --fail-on flag was raised, 2 usage error or no lightning-bn logs.",
    )
    rep.add_argument("logdir", metavar="LOGDIR", type=Path, help="a log directory, e.g. lightning_logs")
    rep.add_argument("--format", choices=("table", "json", "markdown"), default="table", help="default: table")
    rep.add_argument(
        "--fail-on",
        type=_flag_list,
        default=(),
        metavar="FLAGS",
        help=f"exit with status 1 when any of these comma-separated flags is raised: {', '.join(FLAGS)}, or all",
    )
    rep.add_argument(
        "--max-saturation",
        metavar="FRACTION",
        type=_fraction,
        default=defaults.max_saturation,
        help="saturated above this fraction of saturated elements; a ReLU sits near 0.5 by design "
        "(default: %(default)s)",
    )
    rep.add_argument(
        "--max-dead",
        metavar="FRACTION",
        type=_fraction,
        default=defaults.max_dead,
        help="dead above this fraction of units saturated on every sample (default: %(default)s)",
    )
    rep.add_argument(
        "--min-std-ratio",
        metavar="RATIO",
        type=_positive,
        default=defaults.min_std_ratio,
        help="vanishing below this output std relative to the first layer of the same type (default: %(default)s)",
    )
    rep.add_argument(
        "--max-std-ratio",
        metavar="RATIO",
        type=_positive,
        default=defaults.max_std_ratio,
        help="exploding above this output std relative to the first layer of the same type (default: %(default)s)",
    )
    rep.add_argument(
        "--max-update-ratio",
        metavar="RATIO",
        type=_positive,
        default=defaults.max_update_ratio,
        help="exploding above this ||update|| / ||weights|| of one optimizer step (default: %(default)s)",
    )
    return parser


def report(logdir: Path, output: str, fail_on: Sequence[str], thresholds: Thresholds) -> int:
    """Print the report of every run under ``logdir`` to stdout; returns the exit status."""
    if not logdir.exists():
        return _no_logs(f"'{logdir}' does not exist")
    run_dirs = find_runs(logdir)
    if not run_dirs:
        return _no_logs(f"no TensorBoard event files ({_EVENT_GLOB}) under '{logdir}'")
    runs: list[RunHealth] = []
    skipped: list[str] = []
    damaged = [(path, why) for path in _event_files(logdir) for why in [damage(path)] if why is not None]
    for path, why in damaged:
        print(
            f"lightning-bn report: damaged event file '{path}': {why}; what precedes the damage is read",
            file=sys.stderr,
        )
    for run_dir in run_dirs:
        name = run_dir.relative_to(logdir).as_posix() if run_dir != logdir else "."
        accumulator = _load(run_dir)
        health = analyze(_scalars(accumulator), name, thresholds, _layers(accumulator))
        if health.layers:
            runs.append(health)
        else:
            skipped.append(name)
    if not runs:
        if damaged:
            return _no_logs(f"the event files under '{logdir}' are damaged ({', '.join(str(p) for p, _ in damaged)})")
        return _no_logs(
            f"{len(skipped)} run(s) under '{logdir}' but none holds lightning-bn scalars (act_*/<layer>, "
            "grad_norm/<param>, ...)"
        )
    formatter: Callable[[list[RunHealth], list[str], Thresholds], str] = {
        "table": format_table,
        "markdown": format_markdown,
        "json": format_json,
    }[output]
    print(formatter(runs, skipped, thresholds))
    failed = [flag for flag in FLAGS if flag in fail_on and any(flag in run.raised for run in runs)]
    if failed:
        print(f"lightning-bn report: failing on {', '.join(failed)} (--fail-on)", file=sys.stderr)
        return EXIT_FLAGGED
    return EXIT_OK


def format_table(runs: list[RunHealth], skipped: list[str], thresholds: Thresholds) -> str:
    """Aligned plain-text tables, one per run, each followed by its problems."""
    blocks = [_legend(thresholds)]
    for run in runs:
        rows = [_COLUMNS, *(_row(layer) for layer in run.layers)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        blocks.append("\n".join([f"run {run.name}: {_steps(run)}", *lines, *_problems(run, "  ")]))
    if skipped:
        blocks.append(f"skipped (no lightning-bn scalars): {', '.join(skipped)}")
    return "\n\n".join(blocks)


def format_markdown(runs: list[RunHealth], skipped: list[str], thresholds: Thresholds) -> str:
    """A section per run: a pipe table and a list of its problems."""
    blocks = [_legend(thresholds)]
    for run in runs:
        header = "| " + " | ".join(_COLUMNS) + " |"
        rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
        rows = ["| " + " | ".join(cell.replace("|", "\\|") for cell in _row(layer)) + " |" for layer in run.layers]
        blocks.append("\n".join([f"### `{run.name}`", "", _steps(run), "", header, rule, *rows, ""]))
        blocks.append("\n".join(_problems(run, "- ")))
    if skipped:
        blocks.append(f"Skipped (no lightning-bn scalars): {', '.join(f'`{name}`' for name in skipped)}")
    return "\n\n".join(blocks)


def format_json(runs: list[RunHealth], skipped: list[str], thresholds: Thresholds) -> str:
    """One JSON object: ``thresholds``, ``runs`` -> name -> ``steps``, ``layers`` (figures and flags), ``problems``;
    ``flags`` (every flag raised) and ``skipped`` runs. Strict JSON: inf/NaN are written as the strings
    ``"inf"``/``"-inf"``/``"nan"``, figures that were not logged as ``null``.
    """
    document = {
        "version": lightning_bn.__version__,
        "thresholds": asdict(thresholds),
        "runs": {run.name: run.to_dict() for run in runs},
        "flags": [flag for flag in FLAGS if any(flag in run.raised for run in runs)],
        "skipped": skipped,
    }
    return json.dumps(_strict(document), indent=2, allow_nan=False)


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict(item) for item in value]
    return value


def _legend(t: Thresholds) -> str:
    return (
        f"flags: saturated (saturation > {t.max_saturation:g}), dead (dead fraction > {t.max_dead:g}), nonfinite "
        f"(inf/NaN activation or gradient), vanishing / exploding (std/first < {t.min_std_ratio:g} / > "
        f"{t.max_std_ratio:g}; first = the first layer of the same module type, or of the same function for "
        "activations, in runs that logged their layers table (layers in forward order); for the first of each type "
        "and in runs without the table, the first layer of the same kind, activation or not), exploding (update "
        f"ratio > {t.max_update_ratio:g}); {_ZERO_INIT_NOTE}: weights (or a norm's output) exactly 0 at the first "
        f"logged step, not flagged vanishing until std/first reaches {t.min_std_ratio:g}"
    )


def _steps(run: RunHealth) -> str:
    if not run.steps:
        return "no steps"
    order = ", layers in forward order" if run.forward_order else ""
    return (
        f"{len(run.steps)} logged steps ({run.steps[0]}-{run.steps[-1]}), latest figures at step {run.steps[-1]}{order}"
    )


def _row(layer: Any) -> tuple[str, ...]:
    nonfinite = _number(layer.worst_nonfinite, ".0f")
    if layer.nonfinite_gradient:
        nonfinite = "grad" if layer.worst_nonfinite is None else f"{nonfinite}+grad"
    return (
        layer.name,
        _number(layer.saturation, ".2f"),
        _number(layer.worst_saturation, ".2f"),
        _number(layer.dead, ".2f"),
        _number(layer.worst_dead, ".2f"),
        _number(layer.std, ".3g"),
        _number(layer.std_ratio, ".3g"),
        _number(layer.grad_norm, ".3g"),
        _number(layer.update_ratio, ".2g"),
        nonfinite,
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
            f"{found['first_layer']} ({first.flags[flag].reason})"
        )
    if run.zero_init:
        count = len(run.zero_init)
        lines.append(f"{bullet}{_ZERO_INIT_NOTE}: {count} layer{'s' * (count != 1)}: {', '.join(run.zero_init)}")
    return lines


def _no_logs(why: str) -> int:
    print(
        f"lightning-bn report: no lightning-bn logs: {why}. Train with a TensorBoardLogger and ActivationMonitor / "
        "GradientMonitor in the Trainer's callbacks, then point LOGDIR at the logger's directory.",
        file=sys.stderr,
    )
    return EXIT_NO_LOGS


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(**{f.name: getattr(args, f.name) for f in fields(Thresholds)})


def _flag_list(text: str) -> tuple[str, ...]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if "all" in names:
        return FLAGS
    unknown = [name for name in names if name not in FLAGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown flag {', '.join(map(repr, unknown)) or repr(text)}; expected a comma-separated list of "
            f"{', '.join(FLAGS)}, or all"
        )
    return tuple(names)


def _positive(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number but got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] but got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number but got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number but got {text!r}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
