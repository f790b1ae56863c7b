"""The layering of docs/architecture.md: peers import only the layers below them (tracing and the leaves)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bn"
SUBPACKAGES = {
    p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith(("_", "."))
}
BELOW_PEERS = {"activations", "fused", "layers", "sharding", "stats", "tracing"}
ALLOWED = {
    "activations": set(),
    "fused": set(),
    "layers": set(),
    "sharding": set(),
    "stats": {"activations", "fused"},
    "tracing": {"activations", "layers"},
    "init": BELOW_PEERS,
    "norms": BELOW_PEERS,
    "guards": BELOW_PEERS,
    "probes": BELOW_PEERS,
    "recalibration": BELOW_PEERS,
}


def imports_of(part: str) -> set[str]:
    """The lightning_bn packages/modules imported anywhere inside ``part`` (a package or a module)."""
    path = PACKAGE / part
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    found = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_bn"):
                if node.module == "lightning_bn":
                    found |= {a.name for a in node.names if a.name in SUBPACKAGES}
                else:
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lightning_bn.")}
    return found - {part}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_layer_imports_only_what_lies_below(part):
    """Each core package imports only the layers below it (the peers never import each other)."""
    assert imports_of(part) <= ALLOWED[part], imports_of(part) - ALLOWED[part]


def test_the_architecture_page_lists_every_package():
    """docs/architecture.md names every package and module of lightning_bn."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [name for name in SUBPACKAGES if f"`{name}" not in text]
    assert not missing
