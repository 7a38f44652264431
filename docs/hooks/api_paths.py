"""MkDocs hook: lay the source folders out as the installed package, for mkdocstrings.

pyproject.toml installs `compiler/`, `runtime/` and `search/` as `moeforge.compiler`, `moeforge.runtime` and
`moeforge.search` (setuptools `package-dir`). griffe reads sources by folder and cannot follow that mapping,
so this hook links them under `build/apidoc/moeforge/` (gitignored) before the pages are rendered; mkdocs.yml
points mkdocstrings' `paths` there. The docs are read from source: nothing is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "build" / "apidoc" / "moeforge"
LINKS = {
    "__init__.py": ROOT / "moeforge" / "__init__.py",
    "compiler": ROOT / "compiler",
    "runtime": ROOT / "runtime",
    "search": ROOT / "search",
}


def on_startup(**kwargs: Any) -> None:
    TREE.mkdir(parents=True, exist_ok=True)
    for name, target in LINKS.items():
        link = TREE / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(target, TREE), link)
