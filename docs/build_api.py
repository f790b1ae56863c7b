"""Build the HTML API reference of ``lightning_bn`` from its docstrings, with pdoc.

    python docs/build_api.py                        # -> docs/_build/api/index.html
    python docs/build_api.py --check --output /tmp/api

Documents ``lightning_bn`` and every public module below it (a module is private when any part of its dotted name
starts with ``_``). Names that a package exports lazily through a module ``__getattr__`` (the Lightning callbacks of
``lightning_bn``) are resolved first, so they are documented where users import them. ``index.html`` is the page of
``lightning_bn`` itself (its ``__all__``: ``prepare``, ``ActivationMonitor``, ...); each module has its own page.

Docstrings are Google style with Sphinx roles (``:func:`~lightning_bn.tracing.trace_model```); constants are documented
by ``#:`` comments above them, which pdoc does not read, so this script hands them to it.

``--check`` fails (exit status 1, one line per problem) when pdoc warns while building, when a Sphinx role in a
docstring names nothing that exists (``:class:`lightning_bn.NoSuchThing```), or when a name in the ``__all__`` of
``lightning_bn`` or of one of its public subpackages has no docstring of its own.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import pkgutil
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGE = "lightning_bn"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "_build" / "api"

#: A Sphinx cross-reference role: ``:func:`name```, ``:class:`~pkg.Name```, ``:py:attr:`.name```.
ROLE = re.compile(r"(?::py)?:(?:mod|func|data|const|class|meth|attr|exc|obj):`(?P<target>[^`]+)`")
#: An rst literal block: a line ending in ``::``, a blank line, then lines indented deeper.
_LITERAL_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)(?P<intro>\S.*?)::\n\n(?P<block>(?:(?P=indent)[ \t]+\S.*\n|[ \t]*\n)+)", re.MULTILINE
)


def public_modules(package: str = PACKAGE) -> list[str]:
    """``package`` and every module below it whose dotted name has no part starting with ``_``, package first."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.", onerror=lambda name: None):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return [package, *sorted(names[1:])]


def resolve_lazy_exports(modules: list[str]) -> list[str]:
    """Put the names a module's ``__all__`` lists but only its ``__getattr__`` provides into the module, so pdoc
    documents them (it reads ``__dict__``); returns the problems met (names that fail to import)."""
    problems = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # reported when pdoc loads it
            continue
        for member in getattr(module, "__all__", ()):
            if member in vars(module):
                continue
            try:
                vars(module)[member] = getattr(module, member)
            except Exception as err:  # an optional dependency missing, a stale name in __all__
                problems.append(f"{name}.__all__ lists {member!r}, which does not import: {err!r}")
    return problems


def _literal_blocks_to_fences(docstring: str) -> str:
    """``Example::`` + an indented block (rst) -> ``Example:`` + a fenced Python block (Markdown, what pdoc renders);
    pdoc's Google conversion would otherwise quote the block as a section."""

    def fence(m: re.Match[str]) -> str:
        block = inspect.cleandoc(m["block"])
        language = "pycon" if block.startswith(">>>") else "python"
        return f"{m['indent']}{m['intro']}:\n\n```{language}\n{block}\n```\n\n"

    return _LITERAL_BLOCK.sub(fence, docstring + "\n").rstrip("\n")


def _shorten_roles(docstring: str) -> str:
    """``:func:`~a.b.c``` -> ``:func:`a.b.c```: pdoc links the dotted name and knows no ``~``."""
    return ROLE.sub(lambda m: m[0].replace("`~", "`", 1), docstring)


def configure_pdoc() -> Any:
    """Google docstrings, our docstring fix-ups before pdoc's own conversion; returns the ``pdoc`` module."""
    import pdoc
    import pdoc.docstrings
    import pdoc.render

    convert = getattr(pdoc.docstrings.convert, "__wrapped__", pdoc.docstrings.convert)

    def patched(docstring: str, docformat: str, source_file: Path | None) -> str:
        return convert(_literal_blocks_to_fences(_shorten_roles(docstring)), docformat, source_file)

    patched.__wrapped__ = convert  # type: ignore[attr-defined]
    pdoc.docstrings.convert = patched
    pdoc.render.configure(docformat="google", show_source=False, search=True, footer_text="lightning-bn")
    return pdoc


def walk(doc: Any) -> Iterator[Any]:
    """``doc`` and, for modules and classes, every member below it (depth first)."""
    yield doc
    for member in getattr(doc, "own_members", []) if hasattr(doc, "members") else []:
        yield from walk(member)


@functools.cache
def _parsed(module_name: str) -> tuple[list[str], list[ast.stmt]]:
    """The source lines and the statements of a module of ours (nothing for other modules)."""
    module = sys.modules.get(module_name)
    if module is None or not module_name.startswith(f"{PACKAGE}."):
        return [], []
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return [], []
    return source.splitlines(), ast.parse(source).body


def _comment_docstring(module_name: str, qualname: str, seen: frozenset[str] = frozenset()) -> str:
    """The ``#:`` comment lines right above the assignment of ``qualname`` (``NAME`` or ``Class.NAME``), followed
    through ``from ... import NAME`` (pdoc cannot tell which module a constant comes from)."""
    lines, scope = _parsed(module_name)
    *outer, name = qualname.split(".")
    for part in outer:
        found = [s for s in scope if isinstance(s, ast.ClassDef) and s.name == part]
        if not found:
            return ""
        scope = found[0].body
    for stmt in scope:
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            comment, row = [], stmt.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                comment.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            if comment:
                return "\n".join(comment)
        if not outer and isinstance(stmt, ast.ImportFrom) and stmt.module and module_name not in seen:
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    source = importlib.util.resolve_name("." * stmt.level + stmt.module, _package_of(module_name))
                    return _comment_docstring(source, alias.name, seen | {module_name})
    return ""


def _package_of(module_name: str) -> str:
    """The package that relative imports in ``module_name`` start from."""
    return module_name if hasattr(sys.modules.get(module_name), "__path__") else module_name.rpartition(".")[0]


def add_comment_docstrings(all_modules: dict[str, Any]) -> None:
    """Give variables without a docstring the ``#:`` comment above their assignment (Sphinx's convention)."""
    import pdoc.doc

    for module in all_modules.values():
        for doc in walk(module):
            if isinstance(doc, pdoc.doc.Variable) and not doc.docstring:
                # pdoc guesses `taken_from` of a constant (an int, a Union has none): start where it is exported
                doc.docstring = _comment_docstring(doc.modulename, doc.qualname) or _comment_docstring(*doc.taken_from)


def _own_docstring(obj: Any) -> str:
    """The docstring written for ``obj`` itself: not one inherited from a base class, nor a dataclass's signature."""
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__") or ""
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return ""
        return doc.strip()
    return (getattr(obj, "__doc__", None) or "").strip()


def undocumented_exports(all_modules: dict[str, Any]) -> list[str]:
    """Names in the ``__all__`` of a documented package that have no docstring of their own."""
    import pdoc.doc

    problems = []
    for name, module in all_modules.items():
        if not module.is_package:
            continue
        for member in getattr(module.obj, "__all__", ()):
            doc = module.get(member)
            if doc is None:
                problems.append(f"{name}.{member}: listed in __all__ but not documented")
            elif isinstance(doc, pdoc.doc.Variable):
                if not doc.docstring.strip():
                    problems.append(f"{name}.{member}: no docstring (constants take a `#:` comment above them)")
            elif not _own_docstring(doc.obj):
                problems.append(f"{name}.{member}: no docstring")
    return problems


def _exists(dotted: str) -> bool:
    """Whether ``dotted`` names a module, or an attribute reachable from one (class fields and instance attributes
    assigned in ``__init__`` included)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        except Exception:
            return False
        for part in parts[split:]:
            if hasattr(obj, part):
                obj = getattr(obj, part)
            elif inspect.isclass(obj) and _class_attribute(obj, part):
                obj = None
            else:
                break
        else:
            return True
    return False


def _class_attribute(cls: type, name: str) -> bool:
    """Annotated fields (dataclass fields without a default) and ``self.<name> = ...`` in a class's ``__init__``."""
    for klass in inspect.getmro(cls):
        if name in vars(klass).get("__annotations__", {}):
            return True
        init = vars(klass).get("__init__")
        try:
            if init is not None and re.search(rf"\bself\.{re.escape(name)}\s*[:=]", inspect.getsource(init)):
                return True
        except (OSError, TypeError):
            continue
    return False


def _candidates(target: str, module: str, scope: list[str], is_package: bool, exposed_in: list[str]) -> Iterator[str]:
    """Where a role's target may point, looked up like Sphinx and pdoc do: relative (``.name``), in the enclosing
    classes (``scope``, innermost first), in the module (its globals), in the modules that re-export the object,
    then absolute."""
    target = target.strip().lstrip("~").removesuffix("()")
    if target.startswith("."):
        base = module if is_package else module.rpartition(".")[0]
        target = target[1:]
        while target.startswith("."):
            target, base = target[1:], base.rpartition(".")[0]
        yield f"{base}.{target}"
        return
    for depth in range(len(scope), 0, -1):
        yield f"{module}.{'.'.join(scope[:depth])}.{target}"
    for where in [module, *exposed_in]:
        yield f"{where}.{target}"
    yield target


def broken_references(all_modules: dict[str, Any]) -> list[str]:
    """Sphinx roles in our docstrings whose target exists nowhere, as ``where: :role:`target` resolves to nothing``.

    Each docstring is checked once, where it is written (docstrings inherited from other libraries are skipped).
    """
    import pdoc.doc

    exposed: dict[str, list[str]] = {}  # home "module.qualname" -> modules that document it too
    docs: dict[str, Any] = {}
    for module in all_modules.values():
        for doc in walk(module):
            home = doc.modulename if isinstance(doc, pdoc.doc.Module) else ".".join(doc.taken_from)
            if not home.startswith(PACKAGE):
                continue
            docs.setdefault(home, doc)
            if doc.modulename != doc.taken_from[0]:
                exposed.setdefault(home, []).append(doc.modulename)
    problems = []
    for home, doc in sorted(docs.items()):
        if isinstance(doc, pdoc.doc.Module):
            module, scope, is_package, text = doc.modulename, [], doc.is_package, doc.docstring
        else:
            module, qualname = doc.taken_from
            scope = qualname.split(".") if isinstance(doc, pdoc.doc.Class) else qualname.split(".")[:-1]
            is_package = hasattr(sys.modules.get(module), "__path__")
            text = doc.docstring if isinstance(doc, pdoc.doc.Variable) else _own_docstring(doc.obj)
        for m in ROLE.finditer(text or ""):
            candidates = _candidates(m["target"], module, scope, is_package, exposed.get(home, []))
            if not any(_exists(c) for c in candidates):
                problem = f"{home}: {m[0]} resolves to nothing"
                problems += [] if problem in problems else [problem]
    return problems


def build(output: Path, check: bool = False) -> list[str]:
    """Write the reference into ``output``; return the problems found (all of them when ``check``, else only the
    warnings pdoc raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc = configure_pdoc()
        names = public_modules()
        problems = resolve_lazy_exports(names)
        all_modules = {}
        for name in names:
            try:
                all_modules[name] = pdoc.doc.Module.from_name(name)
            except Exception as err:  # e.g. an optional dependency of that module is not installed
                problems.append(f"{name}: not documented, it does not import: {err}")
        add_comment_docstrings(all_modules)
        output.mkdir(parents=True, exist_ok=True)
        for module in all_modules.values():
            page = output / f"{module.fullname.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(pdoc.render.html_module(module, all_modules), encoding="utf-8")
        # the front page is the package's own page (its public API), at the same depth so its links hold
        shutil.copyfile(output / f"{PACKAGE}.html", output / "index.html")
        search = pdoc.render.search_index(all_modules)
        if search:
            (output / "search.js").write_text(search, encoding="utf-8")
        if check:
            problems += undocumented_exports(all_modules)
            problems += broken_references(all_modules)
    pdoc_warnings = [
        f"pdoc: {w.message}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)) and "pdoc" in (w.filename or "")
    ]
    return pdoc_warnings + problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail on pdoc warnings, broken docstring references and undocumented public names",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    problems = build(args.output, check=args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"API reference: {args.output / 'index.html'} ({time.perf_counter() - start:.1f} s)")
    if args.check and problems:
        print(f"build_api --check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
