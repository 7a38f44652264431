"""`moeforge export hf --check` needs transformers (the `hf` extra): without it, or with one too old, nothing is
written and the one line names the install. Runs without transformers installed (the import is made to fail)."""

from __future__ import annotations

import sys
import types

import pytest

from moeforge.cli import main


@pytest.mark.parametrize(
    ("module", "named"),
    [
        (None, "needs transformers, which is not installed"),
        (types.SimpleNamespace(__version__="4.57.1"), "needs transformers >= 5.15, found 4.57.1"),
    ],
    ids=["missing", "too-old"],
)
def test_check_without_a_usable_transformers_writes_nothing(tmp_path, capsys, monkeypatch, module, named):
    monkeypatch.setitem(sys.modules, "transformers", module)  # None: `import transformers` raises ImportError
    out = tmp_path / "out"
    assert main(["export", "hf", "debug", "--out", str(out), "--check"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert named in err and "pip install 'moeforge[hf]'" in err, err
    assert err.startswith("moeforge export: --check:") and "\n" not in err and "Traceback" not in err
    assert not out.exists() and captured.out == ""


def test_export_without_check_needs_no_transformers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["export", "hf", "debug", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_json_without_check_is_refused(tmp_path, capsys):
    assert main(["export", "hf", "debug", "--out", str(tmp_path / "out"), "--json"]) == 2
    assert "--json: prints the --check record; add --check" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
