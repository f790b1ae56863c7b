"""The layering of docs/architecture.md, every layer of it: each module imports only what lies below it, and peers on
one layer import nothing from each other (no upward, no sideways import), the adapters and composition included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bn"
PARTS = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith(("_", "."))}

#: the layers of docs/architecture.md, top to bottom
LAYERS = {
    "adapters": {"callbacks", "monitor", "cli", "tb_plugin"},
    "composition": {"prepare", "report"},
    "peers": {"init", "norms", "guards", "monitoring", "recalibration"},
    "the one trace": {"tracing"},
    "leaves": {"activations", "layers", "sharding", "tags", "checks", "writers"},
}
#: what a leaf may import of the other leaves (a pure-Python vocabulary, nothing else)
LEAVES = {
    "activations": set(),
    "layers": set(),
    "sharding": set(),
    "tags": set(),
    "checks": set(),
    "writers": {"tags"},
}
#: what a part of a layer above the leaves may import sideways (nothing)
BELOW: dict[str, set[str]] = {}
_seen: set[str] = set()
for _layer in reversed(list(LAYERS)):
    for _part in LAYERS[_layer]:
        BELOW[_part] = set(_seen) if _layer != "leaves" else LEAVES[_part]
    _seen |= LAYERS[_layer]


def imports_of(part: str) -> set[str]:
    """The lightning_bn packages/modules imported anywhere inside ``part`` (a package or a module)."""
    path = PACKAGE / part
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    found = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_bn"):
                if node.module == "lightning_bn":
                    found |= {a.name for a in node.names if a.name in PARTS} or {"lightning_bn"}
                else:
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "lightning_bn":
                        found.add("lightning_bn")
                    elif alias.name.startswith("lightning_bn."):
                        found.add(alias.name.split(".")[1])
    return found - {part}


def test_every_part_has_a_layer():
    """A new package or module must be placed in a layer (and the doc must say where)."""
    placed = set().union(*LAYERS.values())
    assert PARTS == placed, (PARTS - placed, placed - PARTS)


@pytest.mark.parametrize("part", sorted(BELOW))
def test_layer_imports_only_what_lies_below(part):
    """No upward and no sideways import, in any layer (the package root counts as the top)."""
    extra = imports_of(part) - BELOW[part]
    assert not extra, f"{part} imports {sorted(extra)}"


def test_report_package_has_no_import_cycle():
    """The report's modules import each other in one direction only."""
    modules = {p.stem: p for p in (PACKAGE / "report").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module in modules:
                    deps.add(node.module)
                elif node.module and node.module.startswith("lightning_bn.report."):
                    deps.add(node.module.split(".")[2])
        graph[name] = deps - {name}

    def reaches(start, target, seen=()):
        return any(dep == target or (dep not in seen and reaches(dep, target, (*seen, dep))) for dep in graph[start])

    assert not [name for name in graph if reaches(name, name)]


def test_the_architecture_page_lists_every_part_in_its_layer():
    """docs/architecture.md names every package and module, in the row of its layer."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for layer, parts in LAYERS.items():
        assert layer in rows, layer
        missing = [name for name in parts if f"`{name}" not in rows[layer]]
        assert not missing, (layer, missing)


def test_the_checker_sees_a_sideways_import(tmp_path):
    """The test above can fail: a peer importing a peer is caught."""
    assert "monitoring" not in BELOW["guards"] and "report" not in BELOW["prepare"]
    assert "monitoring" in BELOW["monitor"] and "tags" in BELOW["writers"]


def test_the_import_graph_on_the_architecture_page_is_measured():
    """The graph docs/architecture.md prints is the one the code has."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    block = text.split("Measured import graph")[1].split("```")[1]
    documented = {}
    for line in block.strip().splitlines():
        part, _, deps = line.partition("->")
        documented[part.strip()] = set() if "(nothing)" in deps else {d.strip() for d in deps.split(",")}
    assert documented == {part: imports_of(part) for part in PARTS}
