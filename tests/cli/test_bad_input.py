"""Bad input never escapes as a traceback: every problem is one located line and the exit status is 2.

The corpus in tests/compiler/bad_specs/ holds malformed specs. Each file starts with one or more lines
``# expect: [FILE@]LINE:COL: KEY: SUBSTRING``: `moeforge validate` must print exactly one line per
expectation, ``FILE:LINE:COL: KEY: ...`` with SUBSTRING in the message (KEY ``-`` for a problem with no key;
FILE, relative to the spec's folder, when the problem is in another file such as a base).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "compiler" / "bad_specs"
CORPUS = sorted(BAD.glob("*.yaml"))
EXPECT = re.compile(
    rb"^# expect: (?:(?P<file>[^@\s]+)@)?(?P<line>\d+):(?P<col>\d+): (?P<key>\S+): (?P<text>.+)$"
)
LINE_SHAPE = re.compile(r"^(?P<file>.+?):(?P<line>[1-9]\d*):(?P<col>[1-9]\d*): (?P<rest>\S.*)$")


def expectations(path: Path) -> list[tuple[str, str]]:
    """(prefix every matching line starts with, substring of its message) for each `# expect:` line."""
    out = []
    for raw in path.read_bytes().splitlines():
        m = EXPECT.match(raw)
        if not m:
            break
        file = path.parent / m["file"].decode() if m["file"] else path
        key = m["key"].decode()
        prefix = f"{file}:{int(m['line'])}:{int(m['col'])}: " + ("" if key == "-" else f"{key}: ")
        out.append((prefix, m["text"].decode()))
    return out


def test_corpus_is_big_and_every_file_says_what_it_expects() -> None:
    assert len(CORPUS) >= 40
    for path in CORPUS:
        assert expectations(path), f"{path.name}: first line must be `# expect: LINE:COL: KEY: message`"


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_validate_reports_each_problem_located(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert out == ""
    lines = err.splitlines()
    for line in lines:
        m = LINE_SHAPE.match(line)
        assert m, f"not file:line:col: message: {line!r}"
        assert Path(m["file"]).is_file(), line
    expected = expectations(path)
    assert len(lines) == len(expected), f"expected {len(expected)} problems, got:\n{err}"
    unmatched = list(lines)
    for prefix, text in expected:
        hit = next((ln for ln in unmatched if ln.startswith(prefix) and text in ln[len(prefix) :]), None)
        assert hit is not None, f"no line starts with {prefix!r} and contains {text!r}:\n{err}"
        unmatched.remove(hit)


@pytest.mark.slow  # one process, but it imports torch
def test_console_script_over_the_whole_corpus_leaks_no_traceback() -> None:
    exe = shutil.which("moeforge") or str(Path(sys.executable).with_name("moeforge"))
    cmd = [exe] if Path(exe).is_file() else [sys.executable, "-m", "moeforge"]
    proc = subprocess.run([*cmd, "validate", *map(str, CORPUS)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == sum(len(expectations(p)) for p in CORPUS)
    assert all(LINE_SHAPE.match(ln) for ln in lines)


# ------------------------------------------------------------------------------ files that are not specs
def _one_problem(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    line = _one_problem(["validate", str(missing)], capsys)
    assert line.startswith(f"{missing}:1:1: no such file or shipped spec")


def test_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_problem(["validate", str(tmp_path)], capsys)
    assert line.startswith(f"{tmp_path}:1:1: is a directory, not a spec file")


def test_misspelled_shipped_name_suggests_the_right_one(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_problem(["validate", "deepseekmoe16b"], capsys)
    assert line == "deepseekmoe16b:1:1: no such file or shipped spec; did you mean 'deepseekmoe-16b'?"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("name: x\n")
    path.chmod(0)
    try:
        line = _one_problem(["validate", str(path)], capsys)
    finally:
        path.chmod(0o600)
    assert line == f"{path}:1:1: cannot read file: Permission denied; check its permissions"


def test_unreadable_file_even_as_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("name: x\n")
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    line = _one_problem(["validate", str(path)], capsys)
    assert line == f"{path}:1:1: cannot read file: Permission denied; check its permissions"


def test_validate_prints_ok_files_and_fails_if_any_is_bad(capsys: pytest.CaptureFixture[str]) -> None:
    bad = BAD / "zero_layers.yaml"
    assert main(["validate", "debug", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "debug: ok (debug)\n"
    assert err.startswith(f"{bad}:5:1: n_layers: ")


def test_validate_json_lists_problems(capsys: pytest.CaptureFixture[str]) -> None:
    bad = str(BAD / "unknown_key_in_gqa.yaml")
    assert main(["validate", "--json", bad, "debug"]) == 2
    res = json.loads(capsys.readouterr().out)
    assert res["debug"] == {"ok": True, "kind": "model", "name": "debug", "problems": []}
    assert res[bad]["ok"] is False
    assert len(res[bad]["problems"]) == 2


# ------------------------------------------------------------------------------------------ search specs
SEARCHES = sorted((ROOT / "specs" / "searches").glob("*.yaml"))
SEARCH_TEXT = """\
name: s
base:
  base: debug
  moe: {paper: {experts: 4, top_k: 1}}
space: {granularity: [1, 2]}
budget: {train_flops: 1.0e+9}
n_trials: 2
"""


def test_validate_accepts_the_shipped_search_specs(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(SEARCHES) >= 2
    assert main(["validate", *map(str, SEARCHES), "quickstart", "debug"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        *(f"{p}: ok (search {p.stem})" for p in SEARCHES),
        "quickstart: ok (search quickstart)",
        "debug: ok (debug)",
    ]


def test_a_search_spec_is_told_by_its_keys_or_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anywhere = tmp_path / "mine.yaml"
    anywhere.write_text(SEARCH_TEXT)
    (tmp_path / "searches").mkdir()
    in_searches = tmp_path / "searches" / "empty.yaml"
    in_searches.write_text("name: e\nbase: debug\n")  # no search key: known by its folder
    assert main(["validate", "--json", str(anywhere), str(in_searches)]) == 2
    res = json.loads(capsys.readouterr().out)
    assert res[str(anywhere)] == {"ok": True, "kind": "search", "name": "s", "problems": []}
    assert res[str(in_searches)]["kind"] == "search"
    assert [p.split(": ")[1] for p in res[str(in_searches)]["problems"]] == ["space", "budget", "n_trials"]


def test_search_only_keys_are_the_search_fields_a_model_spec_lacks() -> None:
    from moeforge.compiler import ModelSpec
    from moeforge.search import SearchSpec

    from moeforge.commands.validate import SEARCH_KEYS

    assert set(SEARCH_KEYS) == set(SearchSpec.model_fields) - set(ModelSpec.model_fields) - {"base"}


@pytest.mark.parametrize("command", ["validate", "search"])
def test_search_spec_problems_are_the_same_located_lines_from_every_command(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        SEARCH_TEXT.replace("base: debug", "base: debug\n  d_model: -64").replace(
            "n_trials: 2", "n_trials: 0"
        )
    )
    argv = [command, str(path)] + (["--out", str(tmp_path / "run")] if command == "search" else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.splitlines() == [
        f"{path}:4:3: base.d_model: must be greater than 0 (got -64)",
        f"{path}:8:1: n_trials: must be greater than 0 (got 0)",
    ]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- other subcommands
@pytest.mark.parametrize(
    "name", ["top_k_over_experts", "tab_indent", "python_object_tag", "base_broken_value"]
)
def test_report_exits_2_with_located_errors(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = BAD / f"{name}.yaml"
    assert main(["report", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == len(expectations(path))
    for prefix, text in expectations(path):
        assert any(ln.startswith(prefix) and text in ln for ln in lines), err


def test_report_with_a_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "debug", "--set", "moe.topk=4"]) == 2
    _, err = capsys.readouterr()
    assert err == "<--set moe.topk=4>:1:1: moe.topk: unknown key; did you mean 'top_k'?\n"


def test_compare_exits_2_with_located_errors(capsys: pytest.CaptureFixture[str]) -> None:
    path = BAD / "kv_heads_not_dividing.yaml"
    assert main(["compare", "debug", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert out == ""
    [(prefix, text)] = expectations(path)
    assert err.startswith(prefix) and text in err
    assert len(err.splitlines()) == 1


def test_compare_with_a_missing_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "debug", "debugg"]) == 2
    _, err = capsys.readouterr()
    assert err == "debugg:1:1: no such file or shipped spec; did you mean 'debug'?\n"
