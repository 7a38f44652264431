"""The tooling pyproject.toml configures holds on the tree: ruff's lint and format, and mypy over every
package (compiler, runtime, search, the CLI, benchmarks). CI runs these through the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # about a minute on 2 CPU cores (mypy checks ~90 files)
def test_mypy_covers_every_package_and_passes() -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    proc = _run(sys.executable, "-m", "mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues found" in proc.stdout


def test_ruff_lint_and_format_pass() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is in the dev extra")
    lint = _run(ruff, "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run(ruff, "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_is_configured_for_every_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    files = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"])
    assert files == {"compiler", "runtime", "search", "moeforge", "benchmarks"}
