"""Children import the moeforge of the process that started them, whatever the working directory.

Issue 17 item 4: run from inside a source checkout with a non-editable install, ``python -m moeforge``
children (search workers, ``train --nproc``'s torchrun processes, a trial's torchrun group) imported the
checkout's ``moeforge/`` folder, which lacks ``moeforge.compiler``, and every one of them died. Here the
working directory holds a bogus ``moeforge/`` package that fails on import: a child that imports it instead
of this process's moeforge says so (or dies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moeforge.runtime import python_module_cmd, torchrun_args

import moeforge
from moeforge.cli import main

HERE = Path(__file__).resolve().parent


@pytest.fixture
def shadow(tmp_path, monkeypatch):
    """A working directory with a `moeforge/` that is not ours (as a checkout's is to an installed one)."""
    cwd = tmp_path / "checkout"
    (cwd / "moeforge").mkdir(parents=True)
    (cwd / "moeforge" / "__init__.py").write_text("raise ImportError('the checkout shadowed moeforge')\n")
    monkeypatch.chdir(cwd)
    return cwd


def _env() -> dict[str, str]:
    """This environment, with tests/runtime on the path for the probe (after the child's own entries)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }


def _expected() -> str:
    import moeforge.runtime

    return f"{moeforge.__file__} {moeforge.runtime.__file__}"


def test_child_imports_the_parents_moeforge(shadow):
    r = subprocess.run(
        python_module_cmd("launch_probe"), env=_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ", 1)[1].strip() == _expected()
    # the same with the old command: the bogus package wins, which is the bug this guards against
    old = subprocess.run([sys.executable, "-m", "launch_probe"], env=_env(), capture_output=True, text=True)
    assert "the checkout shadowed moeforge" in old.stderr


def test_child_gets_module_argv_like_dash_m(shadow):
    """`python_module_cmd("moeforge", ...)` parses its arguments as `python -m moeforge ...` does."""
    r = subprocess.run(python_module_cmd("moeforge", "--version"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"moeforge {moeforge.__version__}"


@pytest.mark.slow
def test_torchrun_children_import_the_parents_moeforge(shadow, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(2, "launch_probe")]
    env = {**_env(), "PROBE_OUT": str(tmp_path)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank-{i}.txt").read_text() for i in (0, 1)] == [_expected()] * 2


@pytest.mark.slow
def test_train_nproc_from_a_checkout(shadow, tmp_path, monkeypatch, capsys):
    """`train --nproc 2` from a directory whose moeforge/ is not the installed one trains."""
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["train", "debug", "--steps", "2", "--nproc", "2", "--device", "cpu", "--batch-size", "4"]
    argv += ["--eval-tokens", "256", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert (out / "summary.json").is_file()


SEARCH = (
    (Path(__file__).parents[1] / "fixtures" / "search" / "tiny.yaml").read_text().replace("cli", "shadow", 1)
)


@pytest.mark.slow
def test_search_workers_from_a_checkout(shadow, tmp_path, monkeypatch, capsys):
    """`search --workers 2` from a directory whose moeforge/ is not the installed one: both workers train."""
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "shadow.yaml"
    spec.write_text(SEARCH)
    out = tmp_path / "search"
    argv = ["search", str(spec), "--out", str(out), "--workers", "2", "--json", "--no-plots"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] == 2 and not summary["worker_errors"]
