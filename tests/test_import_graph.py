"""The import graph: no cycles (imports inside functions included), no package reaching into another's private
modules for search names, and every package directory shipped in the wheel."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "moeforge": "moeforge",
    "compiler": "moeforge.compiler",
    "runtime": "moeforge.runtime",
    "search": "moeforge.search",
    "benchmarks": "benchmarks",
}
"""Source folder -> the module name it is installed as (pyproject's package-dir)."""

KNOWN_CYCLES: set[frozenset[str]] = {
    # Being split on other branches (issue 18, section 1); the integrator empties this set once they merge.
    frozenset({"moeforge.compiler._hf", "moeforge.compiler._hf_card"}),
    frozenset({"moeforge.search._group", "moeforge.search._run"}),
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports at run time, wherever the import statement is (a function's
    body too); `if TYPE_CHECKING:` blocks do not run. `from pkg import sub` counts as importing pkg.sub."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for c in child.orelse:
                    visit_node(c)
            else:
                visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target)
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in out if m in known and m != module}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[frozenset[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            connect(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(p, m, known) for m, p in known.items()}


def test_the_graph_sees_imports_inside_functions(graph: dict[str, set[str]]) -> None:
    # _results imports the scaling fit inside a function (scipy only when a ladder is plotted)
    assert "moeforge.search._scaling.fit" in graph["moeforge.search._results"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycles = [sorted(c) for c in _cycles(graph) if c not in KNOWN_CYCLES]
    assert not cycles, "modules that import each other (a concept sits in the wrong module):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_package_imports_search_internals(graph: dict[str, set[str]]) -> None:
    offenders = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if not m.startswith("moeforge.search")
        for t in sorted(targets)
        if t.startswith("moeforge.search._")
    ]
    assert not offenders, "use the names moeforge.search re-exports:\n" + "\n".join(offenders)


def test_every_package_folder_is_in_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, p in _modules().items() if p.name == "__init__.py" and not m.startswith("benchmarks")}
    assert folders <= packages, f"add to pyproject's [tool.setuptools] packages: {sorted(folders - packages)}"
