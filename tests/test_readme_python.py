"""The docs' "From Python" block (docs/python.md) runs as written and uses only the packages' public names."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"
PACKAGES = {"moeforge.compiler", "moeforge.runtime", "moeforge.search"}


def from_python_block() -> str:
    """The first ```python block of docs/python.md."""
    block = re.search(r"^```python\n(.*?)^```$", PAGE.read_text(), re.M | re.S)
    assert block, "docs/python.md has no ```python block"
    return block.group(1)


def test_the_block_imports_only_public_names() -> None:
    imports = [n for n in ast.walk(ast.parse(from_python_block())) if isinstance(n, ast.ImportFrom)]
    used = {
        (n.module, a.name) for n in imports if n.module and n.module.startswith("moeforge") for a in n.names
    }
    assert {module for module, _ in used} == PACKAGES
    for module, name in used:
        assert name in importlib.import_module(module).__all__, f"{module}.{name} is not public"


@pytest.mark.slow  # trains one model and two search trials: about a minute on 2 CPU cores
def test_the_block_runs_in_a_fresh_directory(tmp_path: Path) -> None:
    # as a user runs it: with the budget floor the suite lifts elsewhere (tests/conftest.py)
    env = {**{k: v for k, v in os.environ.items() if k != "MOEFORGE_MIN_STEPS"}, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", from_python_block()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout.splitlines()
    assert re.fullmatch(r"[\d,]+ parameters, [\d,]+ activated, [\d,]+ training FLOPs per token", out[0])
    assert out[1].startswith("validation loss ") and float(out[1].split()[-1]) > 0
    assert out[-1].startswith("best {'m': ")
    assert sum(" COMPLETE " in line for line in out) == 2
    assert (tmp_path / "runs" / "from-python" / "best.yaml").is_file()
