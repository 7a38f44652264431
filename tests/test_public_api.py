"""Each package's public API is what its __init__ re-exports (`__all__`): every name resolves, and the public
functions and classes say what they do. Other packages use only those names (tests/test_architecture.py)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ("moeforge.compiler", "moeforge.runtime", "moeforge.search")


@pytest.mark.parametrize(
    ("package", "name"),
    [(p, n) for p in PACKAGES for n in importlib.import_module(p).__all__],
)
def test_every_public_name_resolves_and_public_functions_say_what_they_do(package: str, name: str) -> None:
    obj = getattr(importlib.import_module(package), name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        assert not obj.__name__.startswith("_"), name
        assert inspect.getdoc(obj), f"{package}.{name} has no docstring"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_lists_each_name_once(package: str) -> None:
    module = importlib.import_module(package)
    assert len(set(module.__all__)) == len(module.__all__), "a name is listed twice in __all__"
    assert set(module.__all__) <= set(dir(module))
