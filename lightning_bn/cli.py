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
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

from lightning_bn import checks
from lightning_bn.report import FLAGS, RunHealth, Thresholds
from lightning_bn.report.analysis import analyze_runs
from lightning_bn.report.formatting import format_markdown, format_rules, format_table, printable
from lightning_bn.report.reading import _EVENT_GLOB, DamagedFile, ReportWarning, find_runs, read_layers, read_scalars

try:  # the installed distribution's version (the package root is above this adapter)
    __version__ = _version("lightning-bn")
except PackageNotFoundError:  # pragma: no cover - run from a source tree
    __version__ = "unknown"

__all__ = ["EXIT_FLAGGED", "EXIT_NO_LOGS", "EXIT_OK", "find_runs", "main", "read_layers", "read_scalars"]

EXIT_OK = 0
#: a flag named by ``--fail-on`` was raised in some run
EXIT_FLAGGED = 1
#: LOGDIR is missing or holds no lightning-bn scalars (argparse also exits 2 on a usage error)
EXIT_NO_LOGS = 2


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
    try:
        thresholds = _thresholds(args)
    except ValueError as err:  # the checks of Thresholds: the message a Python caller gets
        parser.error(str(err))
    if args.rules:
        print(format_rules(thresholds))
        return EXIT_OK
    if args.logdir is None:
        args.report_parser.error("the following arguments are required: LOGDIR (or --rules)")
    return report(args.logdir, args.format, args.fail_on, thresholds, every_layer=args.all)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-bn`` and its ``report`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-bn", description="Weight initialization and normalization for PyTorch Lightning."
    )
    parser.add_argument("--version", action="version", version=f"lightning-bn {__version__}")
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
    rep.set_defaults(report_parser=rep)
    rep.add_argument("logdir", metavar="LOGDIR", type=Path, nargs="?", help="a log directory, e.g. lightning_logs")
    rep.add_argument("--format", choices=("table", "json", "markdown"), default="table", help="default: table")
    rep.add_argument(
        "--fail-on",
        type=_flag_list,
        default=(),
        metavar="FLAGS",
        help=f"exit with status 1 when any of these comma-separated flags is raised: {', '.join(FLAGS)}, or all",
    )
    rep.add_argument("--all", action="store_true", help="list every layer, not only the flagged ones")
    rep.add_argument(
        "--rules",
        action="store_true",
        help="print the rule of every flag with the thresholds in effect (the options below) and exit; no LOGDIR",
    )
    threshold_options = [
        ("--min-transmission", _number, "saturated below this gradient transmission (mean f'(x)^2 relative to a "
         "healthy N(0, 1) input)"),
        ("--saturation-margin", _number, "saturated above the activation kind's healthy saturation (at a N(0, 1) "
         "input: 0.5 for ReLU, ~0 for tanh/sigmoid) plus this"),
        ("--max-saturation", _number, "an absolute saturation limit for every kind instead of the per-kind rule"),
        ("--max-dead", _number, "dead above this fraction of units saturated on every sample ..."),
        ("--min-dead-samples", _number, "... judged only where each unit was seen at least this many times"),
        ("--min-std-ratio", _number, "vanishing below this output std relative to the first layer of the same type"),
        ("--max-std-ratio", _number, "exploding above this output std relative to the first layer of the same type"),
        ("--max-update-ratio", _number, "exploding above this ||update|| / ||weights|| of one optimizer step"),
        ("--min-grad-ratio", _number, "vanishing_gradient below this relative gradient ||g||/||w|| relative to the "
         "median layer's at the same step (or a gradient exactly 0 with non-zero weights)"),
        ("--max-gradient-decades", _number, "the depth rule: vanishing_gradient / exploding_gradient when "
         "log10(||g||/||w||) fitted against depth spans more than this over the stack ..."),
        ("--trend-grad-ratio", _number, "... on the layers below this times the top decile (above the bottom decile "
         "over this)"),
        ("--max-weight-ratio", _number, "name the weight scale as the cause when a starved layer's weights are above "
         "this times the median layer's"),
        ("--min-update-ratio", _number, "stalled below this update ratio ..."),
        ("--stalled-steps", _number, "... on this many consecutive logged steps ..."),
        ("--min-loss-improvement", _number, "... while the training loss falls by less than this fraction ..."),
        ("--converged-loss", _number, "... and stays above this"),
        ("--max-attention-logit", _number, "attention_logit_growth above this max pre-softmax logit of an attention "
         "row ..."),
        ("--attention-logit-growth", _number, "... or when it grows by this factor ..."),
        ("--attention-logit-window", _number, "... within this many logged steps ..."),
        ("--attention-logit-floor", _number, "... to beyond this"),
        ("--min-entropy-fraction", _number, "attention_entropy_collapse below this fraction of an attention row's "
         "mean entropy at its first logged step ..."),
        ("--min-attention-entropy", _number, "... and below this many nats"),
        ("--max-log-z", _number, "output_logit_divergence when the mean log Z of the output logits is further than "
         "this from 0 ..."),
        ("--max-log-z-drift", _number, "... and has moved more than this from its value at the first logged step"),
    ]  # fmt: skip
    for option, kind, text in threshold_options:
        default = getattr(defaults, option[2:].replace("-", "_"))
        rep.add_argument(
            option,
            metavar="VALUE",
            type=kind,
            default=default,
            help=f"{text} (default: {'per kind' if default is None else default})".replace("%", "%%"),
        )
    return parser


def report(logdir: Path, output: str, fail_on: Sequence[str], thresholds: Thresholds, every_layer: bool = False) -> int:
    """Print the report of every run under ``logdir`` to stdout; returns the exit status."""
    if not logdir.exists():
        return _no_logs(f"'{logdir}' does not exist")
    run_dirs = find_runs(logdir)
    if not run_dirs:
        return _no_logs(f"no TensorBoard event files ({_EVENT_GLOB}) under '{logdir}'")
    with warnings.catch_warnings(record=True) as caught:  # what the reader refuses, printed as our own lines
        warnings.simplefilter("always", ReportWarning)
        runs, skipped = analyze_runs(logdir, thresholds)
    damaged = []
    for warning in caught:
        if isinstance(warning.message, ReportWarning):
            print(f"lightning-bn report: {printable(str(warning.message))}", file=sys.stderr)
            if isinstance(warning.message, DamagedFile):
                damaged.append(warning.message.path)
        else:  # not ours: as it would have been shown
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not runs:
        if damaged:
            return _no_logs(f"the event files under '{logdir}' are damaged ({', '.join(str(p) for p in damaged)})")
        return _no_logs(
            f"{len(skipped)} run(s) under '{logdir}' but none holds lightning-bn scalars (act_*/<layer>, "
            "grad_norm/<param>, ...)"
        )
    if output == "json":
        print(format_json(runs, skipped, thresholds))
    else:
        print((format_markdown if output == "markdown" else format_table)(runs, skipped, thresholds, every_layer))
    failed = [flag for flag in FLAGS if flag in fail_on and any(flag in run.raised for run in runs)]
    if failed:
        print(f"lightning-bn report: failing on {', '.join(failed)} (--fail-on)", file=sys.stderr)
        return EXIT_FLAGGED
    return EXIT_OK


def format_json(runs: list[RunHealth], skipped: list[str], thresholds: Thresholds) -> str:
    """One JSON object: ``thresholds``, ``runs`` -> name -> ``steps``, ``layers`` (figures and flags), ``problems``;
    ``flags`` (every flag raised) and ``skipped`` runs. Strict JSON: inf/NaN are written as the strings
    ``"inf"``/``"-inf"``/``"nan"``, figures that were not logged as ``null``.
    """
    document = {
        "version": __version__,
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


def _no_logs(why: str) -> int:
    print(
        f"lightning-bn report: no lightning-bn logs: {printable(why)}. Train with a TensorBoardLogger and "
        "ActivationMonitor / GradientMonitor in the Trainer's callbacks, then point LOGDIR at the logger's directory.",
        file=sys.stderr,
    )
    return EXIT_NO_LOGS


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(**{f.name: getattr(args, f.name) for f in fields(Thresholds) if hasattr(args, f.name)})


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


def _number(text: str) -> int | float:
    """A threshold typed on the command line; its range is checked by :class:`Thresholds` (one set of checks)."""
    try:
        return checks.parse_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


if __name__ == "__main__":
    raise SystemExit(main())
