"""The architecture zoo as a table: what ``prepare()`` and the init check do on each model of ``tests/zoo.py``.

One command, one process, writes ``docs/zoo.md``::

    python benchmarks/zoo_table.py

Per architecture (built fresh, random weights, small config, CPU, one torch thread): the spot checks of the traced
activations passed, ``init_mismatches`` findings as built and after ``prepare``, the layers ``prepare`` initialized,
kept (``report.kept``, with the reasons) and skipped, ``prepare``'s wall time, and the activation sites the
``act_saturation`` monitors would watch (``len(trace_model(model, x).sites)``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_bn  # noqa: E402
from lightning_bn.guards import init_mismatches  # noqa: E402
from lightning_bn.tracing import trace_model  # noqa: E402
from tests.zoo import ZOO  # noqa: E402

HEADER = (
    "architecture",
    "layers initialized",
    "kept (reason)",
    "skipped (reason)",
    "spot checks",
    "init-check findings before / after",
    "prepare() ms",
    "act_saturation sites",
)

INTRO = """# The architecture zoo

How `prepare()` and the init check behave on real architectures, built from the libraries that define them
(transformers, Lightning's demos) and on local stand-ins of timm / torchvision patterns, all with random weights and
small configs (hidden 64, 2 layers, 32 px images, sequence 16, vocabulary 100; the models of `tests/zoo.py`, which
`tests/test_zoo.py` checks). The table is produced by `python benchmarks/zoo_table.py`: for each model, built fresh on
CPU with one torch thread, it runs the spot checks of the traced activations (`trace_model(model, x).layers`),
`init_mismatches(model, x)` as built, `prepare(model, x)` (timed once with `time.perf_counter`), and
`init_mismatches` again; *layers initialized* counts the report's rows whose scheme is not `skip`, *kept* and
*skipped* group `report.kept` and `report.skipped` by reason (with the number of layers and the first one named),
and *act_saturation sites* is the number of activation sites the saturation monitor would watch
(`len(trace_model(model, x).sites)`). `tests/test_zoo.py` expects 0 / 0 init-check findings on every row: the
architectures' own inits are deliberate, and `prepare()` must leave nothing to find. The one exception is true:
transformers' EfficientNet draws every BatchNorm gamma from N(0, 0.02) in `_init_weights` (the paper and timm use 1),
so its signal does vanish with depth as built; the check says so (vanishing, and the squeeze-excite convs that starve),
and after `prepare()` nothing is left."""


def _grouped(entries: Iterable[Any]) -> str:
    """``n × reason (`first`, ...)`` per reason, one per line of the cell; ``-`` if none."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        by_reason[str(getattr(entry, "reason", "?"))].append(str(getattr(entry, "layer", "?")))
    if not by_reason:
        return "-"
    cells = []
    for reason, layers in by_reason.items():
        more = f", +{len(layers) - 1}" if len(layers) > 1 else ""
        cells.append(f"{len(layers)} × {reason} (`{layers[0]}`{more})")
    return "<br>".join(_escape(c) for c in cells)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _spot_checks(case: Any) -> str:
    layers = trace_model(case.model, case.example_input).layers
    passed = sum(name in layers and layers[name].activation.describe() == want for name, want in case.expected.items())
    return f"{passed}/{len(case.expected)}"


def row(name: str) -> tuple[str, ...]:
    try:
        case = ZOO[name]()
    except ImportError as error:
        return (name, "not built", "-", _escape(str(error)), "-", "-", "-", "-")
    x = case.example_input
    spots = _spot_checks(case)
    sites = len(trace_model(case.model, x).sites)
    before = len(init_mismatches(case.model, x))
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        report = lightning_bn.prepare(case.model, x)
    except Exception as error:  # a row of the table, not the end of the run
        ms = (time.perf_counter() - start) * 1e3
        return (name, f"prepare() raised {_escape(repr(error))[:200]}", "-", "-", spots, f"{before} / -", f"{ms:.0f}",
                str(sites))  # fmt: skip
    ms = (time.perf_counter() - start) * 1e3
    after = len(init_mismatches(case.model, x))
    initialized = sum(r.scheme != "skip" for r in report.layers)
    kept = _grouped(getattr(report, "kept", None) or [])
    skipped = _grouped(report.skipped)
    return (name, str(initialized), kept, skipped, spots, f"{before} / {after}", f"{ms:.0f}", str(sites))


def table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo.md")
    parser.add_argument("names", nargs="*", help="zoo entries (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.names or list(ZOO):
        rows.append(row(name))
        print(" | ".join(rows[-1][:2] + rows[-1][4:]), flush=True)
    versions = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    try:
        import transformers

        versions.insert(1, f"transformers {transformers.__version__}")
    except ImportError:
        pass
    text = f"{INTRO}\n\n{table(rows)}\n\nGenerated with {', '.join(versions)} on {platform.machine()}.\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
