"""The documentation stays true: the per-kind table of the charts page and the API reference build."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_{Path(script).stem}", DOCS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_charts_page_table_is_current():
    """The kinds table of docs/reading-the-charts.md is what docs/charts_table.py computes from the registry now."""
    charts = _load("charts_table.py")
    page = (DOCS / "reading-the-charts.md").read_text(encoding="utf-8")
    assert charts.page_table(page) == charts.table(), "run: python docs/charts_table.py --write"


def test_charts_table_lists_every_builtin_kind_once():
    """One row per built-in kind, with ReLU's healthy saturation of one half."""
    charts = _load("charts_table.py")
    rows = charts.table().splitlines()[2:]
    names = [row.split("|")[1].strip().strip("`").split("(")[0] for row in rows]
    assert names == [kind.name for kind in charts.builtin_kinds()]
    relu = next(row for row in rows if row.startswith("| `relu` |")).split(" | ")
    assert relu[charts.COLUMNS.index("healthy `act_saturation`")] == "0.500"


@pytest.mark.slow
def test_api_reference_builds(tmp_path):
    """docs/build_api.py --check builds the reference without problems; its front page documents the public API."""
    pytest.importorskip("pdoc")
    result = subprocess.run(
        [sys.executable, str(DOCS / "build_api.py"), "--check", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "ActivationMonitor" in index and "prepare" in index
    assert (tmp_path / "lightning_bn" / "callbacks.html").exists()
