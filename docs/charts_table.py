"""The per-kind table of ``docs/reading-the-charts.md``, computed from the activation registry so it stays true.

    python docs/charts_table.py            # print the table
    python docs/charts_table.py --write    # rewrite it in the page, between the kinds:start / kinds:end markers
    python docs/charts_table.py --check    # exit 1 when the page's table is not what the registry gives now

For every built-in kind, at its default parameters: the recommended init and its gain, the output range, where the
input counts as saturated, and what the monitors read at a healthy input (pre-activation ``z ~ N(0, 1)``):
``act_saturation``, ``act_zero``, ``act_mean``, ``act_std``, ``act_kurtosis``; where the per-element ``saturated``
rule of runs without ``act_transmission`` starts; and ``act_transmission`` when the pre-activation std is 0.5 or 2
instead of 1 (1 at std 1 by definition: the healthy range of a layer within a factor 2 of unit scale).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from lightning_bn.activations import Activation, ActivationKind, get_activation, registered_kinds
from lightning_bn.activations.meanfield import critical_point
from lightning_bn.monitoring.rows import DEFAULT_ZERO_TOL
from lightning_bn.report import Thresholds
from lightning_bn.tracing.policy import BOUNDED_CHAIN_KINDS

PAGE = Path(__file__).resolve().parent / "reading-the-charts.md"
START, END = "<!-- kinds:start -->", "<!-- kinds:end -->"

# midpoints of a fine grid over [-12, 12] (no point at exactly 0, where ReLU & co. change)
_EDGES = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
_Z = (_EDGES[1:] + _EDGES[:-1]) / 2
_WEIGHTS = torch.exp(-0.5 * _Z * _Z) / math.sqrt(2 * math.pi) * (_EDGES[1] - _EDGES[0])

COLUMNS = (
    "kind",
    "init",
    "output range",
    "saturated input",
    "healthy `act_saturation`",
    "`saturated` above",
    "`act_zero`",
    "`act_mean`",
    "`act_std`",
    "`act_kurtosis`",
    "`act_transmission` at std 0.5 / 2",
    "init gain",
    "critical σ_w², σ_b² (q*)",
)


def builtin_kinds() -> list[ActivationKind]:
    """The kinds ``lightning_bn.activations`` registers itself, in registration order (not kinds added at run time)."""
    from lightning_bn.activations import builtins

    ours = {id(kind) for kind in builtins._BUILTINS}
    return [kind for kind in registered_kinds() if id(kind) in ours]


def _number(v: float) -> str:
    """3 decimals; ``0`` for exact zeros and ``≈0`` for values that would print as 0.000."""
    if v == 0 or abs(v) < 1e-12:
        return "0"
    if abs(v) < 5e-4:
        return "≈0"
    return f"{v:.3f}"


def _bound(v: float) -> str:
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    text = f"{v:.3g}"
    return text.replace("-", "−")


def _saturated_input(act: Activation) -> str:
    low, high = act.asymptotes
    parts = ([f"x ≤ {_bound(low)}"] if math.isfinite(low) else []) + (
        [f"x ≥ {_bound(high)}"] if math.isfinite(high) else []
    )
    return " or ".join(parts) or "never"


def _output_range(act: Activation) -> str:
    """``low … high`` of ``f``: its extremes on the fine grid and its limits far out (``±∞`` where it grows)."""
    far = act(torch.tensor([-1e6, 1e6], dtype=torch.float64)).double().tolist()
    y = act(_Z).double()
    low = -math.inf if far[0] < -1e3 else min(float(y.min()), far[0])
    high = math.inf if far[1] > 1e3 else max(float(y.max()), far[1])
    return f"{_bound(round(low, 3) + 0.0)} … {_bound(round(high, 3) + 0.0)}"


def healthy_figures(act: Activation) -> dict[str, float]:
    """What ``ActivationMonitor`` reads from ``act``'s output when its input is ``z ~ N(0, 1)``: ``zero`` (the
    fraction with ``|f(z)| <= DEFAULT_ZERO_TOL``), ``mean``, ``std`` and Pearson's ``kurtosis`` (3 for a Gaussian).

    Example::

        >>> f = healthy_figures(get_activation("relu"))
        >>> round(f["zero"], 3), round(f["mean"], 3), round(f["std"], 3)
        (0.5, 0.399, 0.584)
    """
    y = act(_Z).double()
    mean = float((_WEIGHTS * y).sum())
    var = float((_WEIGHTS * (y - mean) ** 2).sum())
    fourth = float((_WEIGHTS * (y - mean) ** 4).sum())
    return {
        "zero": float((_WEIGHTS * (y.abs() <= DEFAULT_ZERO_TOL)).sum()),
        "mean": mean,
        "std": math.sqrt(var),
        "kurtosis": fourth / var**2 if var > 0 else math.nan,
    }


def _critical(act: Activation) -> str:
    """The mean-field critical point, or why there is none."""
    point = critical_point(act)
    if not math.isfinite(point.weight_variance):
        return "none"
    text = f"{point.weight_variance:.4g}, {point.bias_variance:.3g} ({point.q:.3g})"
    return text if point.stable else f"unstable: {text}"


def table() -> str:
    """The Markdown table of every built-in kind."""
    margin = Thresholds().saturation_margin
    rows = [COLUMNS, ("---",) * len(COLUMNS)]
    for kind in builtin_kinds():
        act = get_activation(kind.name)
        figures = healthy_figures(act)
        rows.append(
            (
                f"`{act.describe()}`",
                f"critical in a chain, {kind.init} as a gate" if kind.name in BOUNDED_CHAIN_KINDS else kind.init,
                _output_range(act),
                _saturated_input(act),
                _number(act.healthy_saturation),
                _number(act.healthy_saturation + margin),
                _number(figures["zero"]),
                _number(figures["mean"]),
                _number(figures["std"]),
                _number(figures["kurtosis"]),
                f"{_number(act.transmission(0.5))} / {_number(act.transmission(2.0))}",
                _number(act.gain),
                _critical(act),
            )
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def page_table(text: str) -> str:
    """The table between the markers of a page's text (stripped)."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip()


def rewrite(text: str) -> str:
    """The page's text with the table between the markers replaced by :func:`table`."""
    start, end = text.index(START) + len(START), text.index(END)
    return f"{text[:start]}\n{table()}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", type=Path, default=PAGE, help=f"default: {PAGE}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in the page")
    mode.add_argument("--check", action="store_true", help="exit 1 if the page's table is out of date")
    args = parser.parse_args(argv)
    if args.write:
        text = args.page.read_text(encoding="utf-8")
        args.page.write_text(rewrite(text), encoding="utf-8")
        print(f"rewrote the table in {args.page}")
    elif args.check:
        if page_table(args.page.read_text(encoding="utf-8")) != table():
            print(
                f"{args.page}: the kinds table is out of date; run python docs/charts_table.py --write", file=sys.stderr
            )
            return 1
    else:
        print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
