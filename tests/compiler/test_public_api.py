"""moeforge.compiler's public API is what its __init__ re-exports; other packages use only that."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import moeforge.compiler as compiler
import pytest

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_IMPORT = re.compile(r"moeforge\.compiler\._\w+|from moeforge\.compiler import _\w+")


@pytest.mark.parametrize("name", compiler.__all__)
def test_every_public_name_resolves_and_public_functions_say_what_they_do(name: str) -> None:
    obj = getattr(compiler, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        assert not obj.__name__.startswith("_"), name
        assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize("package", ["search", "runtime", "moeforge"])
def test_no_package_imports_compiler_internals(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for m in PRIVATE_IMPORT.finditer(path.read_text())
    ]
    assert not offenders, "use the names moeforge.compiler re-exports:\n" + "\n".join(offenders)
