"""The search engine's modules form layers: each imports only modules below it, inside functions too,
so no cycle can hide in a function-level import (issue 18)."""

import ast
from pathlib import Path

import pytest

SEARCH = Path(__file__).resolve().parents[2] / "search"

# Bottom to top; a module may import the ones before it (and nothing above it).
LAYERS = (
    "_errors",
    "_spec",
    "_space",
    "_trials",
    "_records",
    "_tracking",
    "_storage",
    "_heartbeat",
    "_samplers",
    "_data",
    "_study",
    "_training",
    "_branching",
    "_group",
    "_evaluate",
    "_checkpoints",
    "_worker",
)


def _search_imports(module: str) -> set[str]:
    """Sibling modules that `search/<module>.py` imports anywhere (module level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse((SEARCH / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 0 and (node.module or "").startswith("moeforge.search."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("moeforge.search.")}
    return out


@pytest.mark.parametrize("module", LAYERS)
def test_engine_modules_import_only_lower_layers(module):
    below = set(LAYERS[: LAYERS.index(module)])
    assert _search_imports(module) <= below, f"{module} imports {sorted(_search_imports(module) - below)}"
