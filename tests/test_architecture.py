"""The layout's rules, read off the source: arrows point one way and nothing crosses a package's front door.

- No import cycle between moeforge's modules, counting every import: at module level, inside functions and
  under `if TYPE_CHECKING:` alike (an import inside a function hides a cycle, it does not remove it).
- Layers: runtime -> nothing of moeforge; compiler -> runtime; search -> compiler, runtime; the CLI
  (moeforge.*) and benchmarks -> any library package. Nothing imports the CLI or benchmarks.
- Across packages only public names: no `moeforge.runtime._x` (or `from moeforge.runtime import _x`)
  outside runtime, and so on for every package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {
    "compiler": "moeforge.compiler",
    "runtime": "moeforge.runtime",
    "search": "moeforge.search",
    "moeforge": "moeforge",
    "benchmarks": "benchmarks",
}
# what each package may import (besides itself)
LAYERS = {
    "moeforge.runtime": set(),
    "moeforge.compiler": {"moeforge.runtime"},
    "moeforge.search": {"moeforge.compiler", "moeforge.runtime"},
    "moeforge": {"moeforge.compiler", "moeforge.runtime", "moeforge.search"},
    "benchmarks": {"moeforge.compiler", "moeforge.runtime", "moeforge.search", "moeforge"},
}


def _modules() -> dict[str, Path]:
    """Every module of moeforge and the benchmarks by dotted name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _package_of(module: str) -> str:
    """The library package a module belongs to (the longest FOLDERS value that prefixes it)."""
    return max((p for p in FOLDERS.values() if module == p or module.startswith(p + ".")), key=len)


def _imports(module: str, path: Path) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every import in the file, wherever it sits."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(node.lineno, target, alias.name) for alias in node.names]
    return out


def _edges() -> dict[str, list[tuple[str, int]]]:
    """module -> [(module it imports, line)], moeforge's and the benchmarks' modules only."""
    edges: dict[str, list[tuple[str, int]]] = {m: [] for m in MODULES}
    for module, path in MODULES.items():
        for line, target, name in _imports(module, path):
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            if name is not None and f"{target}.{name}" in MODULES:
                target = f"{target}.{name}"
            if target in MODULES and target != module and target not in {t for t, _ in edges[module]}:
                edges[module].append((target, line))
    return edges


def _cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_the_rules_see_every_package() -> None:
    for package in FOLDERS.values():
        assert package in MODULES, package
    assert len(MODULES) > 40


def test_no_import_cycle_even_inside_functions() -> None:
    edges = _edges()
    cycles = _cycles(edges)
    described = []
    for component in cycles:
        members = set(component)
        links = [f"    {m}:{line} -> {t}" for m in component for t, line in edges[m] if t in members]
        described.append("cycle among " + ", ".join(component) + "\n" + "\n".join(links))
    assert not cycles, "\n".join(described)


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("def f():\n    from .a import g\n")
    edges = {"moeforge.search.a": [], "moeforge.search.b": []}
    for name, path in (("moeforge.search.a", a), ("moeforge.search.b", b)):
        for _, target, sub in _imports(name, path):
            full = f"{target}.{sub}" if sub and f"{target}.{sub}" in edges else target
            if full in edges:
                edges[name].append((full, 1))
    assert _cycles(edges) == [["moeforge.search.a", "moeforge.search.b"]]


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_arrows_point_one_way(package: str) -> None:
    allowed = LAYERS[package] | {package}
    offenders = [
        f"{MODULES[m].relative_to(ROOT)}:{line}: imports {t}"
        for m, targets in _edges().items()
        if _package_of(m) == package
        for t, line in targets
        if _package_of(t) not in allowed
    ]
    assert not offenders, f"{package} may import only {sorted(allowed)}:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", sorted(FOLDERS.values()))
def test_no_private_name_crosses_a_package_boundary(package: str) -> None:
    offenders = []
    for module, path in MODULES.items():
        if _package_of(module) != package:
            continue
        for line, target, name in _imports(module, path):
            if not target.startswith(("moeforge", "benchmarks")):
                continue
            full = f"{target}.{name}" if name else target
            owner = _package_of(full) if any(full.startswith(p) for p in FOLDERS.values()) else None
            if owner is None or owner == package:
                continue
            inside = full[len(owner) + 1 :].split(".") if full != owner else []
            if any(part.startswith("_") and not part.endswith("__") for part in inside):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {full}")
    assert not offenders, "use the names the package's __init__ re-exports:\n" + "\n".join(offenders)


def test_every_package_folder_is_in_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, p in MODULES.items() if p.name == "__init__.py" and not m.startswith("benchmarks")}
    assert folders <= packages, f"add to pyproject's [tool.setuptools] packages: {sorted(folders - packages)}"
