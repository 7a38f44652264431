"""`moeforge list`: every shipped spec, one line each, with what it is (issue 17 item 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moeforge.compiler import account, load_spec, shipped_names
from moeforge.search import load_search

from moeforge.cli import main

MODELS = shipped_names("models")
SEARCHES = shipped_names("searches")


def test_help_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "\n    list " in out
    assert "moeforge list " in out  # in the examples too


def test_one_line_per_shipped_spec_with_its_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    models_at = next(i for i, ln in enumerate(lines) if ln.startswith("models "))
    searches_at = next(i for i, ln in enumerate(lines) if ln.startswith("searches "))
    model_lines = [ln for ln in lines[models_at + 1 : searches_at] if ln.strip()]
    search_lines = [ln for ln in lines[searches_at + 1 :] if ln.strip()]
    assert [ln.split()[0] for ln in model_lines] == MODELS
    assert [ln.split()[0] for ln in search_lines] == SEARCHES
    debug = next(ln for ln in model_lines if ln.split()[0] == "debug")
    acc = account(load_spec("debug"))
    assert f"{acc.params_total / 1e3:.1f}K params" in debug
    assert f"{acc.params_activated / 1e3:.1f}K activated" in debug
    assert "MoE 1 shared + top-2 of 8 routed" in debug
    assert "A tiny DeepSeekMoE model that trains in seconds on CPU" in debug
    quick = next(ln for ln in search_lines if ln.split()[0] == "quickstart")
    assert "8e+11 FLOPs/trial, 5 trials" in quick and "axes m, K_s" in quick


def test_paper_form_specs_show_the_derived_experts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["deepseekmoe-2b"])
    assert "MoE 1 shared + top-7 of 63 routed" in line
    assert "None" not in line


def test_json_has_exact_counts_and_the_search_axes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in res["models"]] == MODELS
    for m in res["models"]:
        acc = account(load_spec(m["name"]))
        assert (m["params"], m["activated"]) == (acc.params_total, acc.params_activated)
        assert Path(m["path"]).is_file() and m["description"]
    assert [s["name"] for s in res["searches"]] == SEARCHES
    for s in res["searches"]:
        spec = load_search(s["name"])
        assert s["budget_flops"] == list(spec.budget.budgets)
        assert (s["n_trials"], s["axes"], s["seeds"]) == (
            spec.n_trials,
            list(spec.space.names),
            len(spec.seeds),
        )


def test_kind_filters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "searches", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["searches"]
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "searches" not in out.splitlines()[0] and len(out.splitlines()) == len(MODELS) + 1


def test_a_broken_spec_is_listed_with_its_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import moeforge.compiler

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.yaml").write_text("# Broken on purpose.\nname: bad\nn_layers: -1\n")
    (tmp_path / "searches").mkdir()
    monkeypatch.setattr(moeforge.compiler, "shipped_dir", lambda kind="models": tmp_path / kind)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["bad"])
    assert "invalid" in line and "bad.yaml:2:1: vocab_size: required key is missing" in line
    assert "  (none)" in out  # no searches
