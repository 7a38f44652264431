"""The Hugging Face interop modules import one way, bottom up, with no cycle (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

COMPILER = Path(__file__).resolve().parents[2] / "compiler"

# Each module may import only those listed before it (and the non-hf compiler modules).
ORDER = (
    "_hf_formats",
    "_hf_import",
    "_hf_expressible",
    "_hf_export",
    "_hf_weights",
    "_hf_card",
    "_hf_io",
    "_hf_check",
)


def _imports(module: str) -> set[str]:
    """compiler modules `module` imports anywhere in its body (``from ._x import y``, ``from . import _x``)."""
    tree = ast.parse((COMPILER / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moeforge.compiler."):
            found.add(node.module.split(".")[2])
    return found


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p.stem) for p in COMPILER.glob("*.py") if p.stem != "__init__"}


def test_the_hf_modules_are_the_ones_listed() -> None:
    assert {p.stem for p in COMPILER.glob("_hf*.py")} == set(ORDER)


def test_hf_modules_import_only_lower_ones() -> None:
    graph = _graph()
    for i, module in enumerate(ORDER):
        higher = graph[module] & set(ORDER[i:])
        assert not higher, f"{module} imports {sorted(higher)}, which sit above it"


def test_no_import_cycle_in_the_compiler() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
