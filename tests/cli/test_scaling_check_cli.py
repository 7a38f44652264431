"""`moeforge scaling check` (a law checks itself at a new budget) and `scaling fit`'s decision accuracy, end to
end: a tiny study (debug base, sizes 0.5 and 1, two seeds) whose fit.json is made by hand, so the law's
95% interval is known to hold the measured loss or to miss it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from moeforge.compiler import account, load_spec
from moeforge.search import Fit, load_search

from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL, main

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "scaling" / "trials.json"
STUDY = """\
name: tiny
base:
  base: debug
  moe: {paper: {experts: 4, top_k: 1, m: 1, shared: 0}}
space:
  granularity: [1, 2]
  size: [0.5, 1]
budget: {train_flops: [1.0e+9, 2.0e+9]}
sampler: {kind: grid, seed: 0}
n_trials: 8
seeds: [0, 1]
train:
  device: cpu
  cpu_threads: 1
  eval_points: 1
  batch_size: 2
  options: {eval_tokens: 512}
"""
BUDGET = "4e9"  # twice the study's largest budget: a few optimizer steps of the debug model


def write_fit(
    tmp: Path, name: str, e_range: tuple[float, float], study: str = STUDY, samples: int = 40
) -> Path:
    """A chinchilla fit of the tiny study whose bootstrap spreads only E over `e_range`: the 95% interval of
    every prediction is about that range (the A and B terms are ~0.02 here)."""
    (tmp / f"{name}.yaml").write_text(study)
    search = load_search(tmp / f"{name}.yaml")
    consts = {"E": 5.0, "A": 3.5, "B": 1.0, "alpha": 0.5, "beta": 0.5}
    fit = Fit(
        law="chinchilla",
        constants=consts,
        ci={k: [v, v] for k, v in consts.items()},
        samples=[{**consts, "E": float(e)} for e in np.linspace(*e_range, samples)],
        rmse=0.0,
        holdout=None,
        n_points=8,
        n_kind="activated_non_embedding",
        source="tiny",
        budgets=[1e9, 2e9],
        granularities=[1.0, 2.0],
        bootstrap={"resamples": samples, "converged": samples, "seed": 0, "confidence": 0.95},
        search=search.model_dump(mode="json"),
        best_params={"m": 1, "size": 0.5, "budget": 2e9},
    )
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(fit.to_json()))
    return path


def stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("trials/*/seed-*/summary.json")}


def test_check_holds_then_misses_and_reuses_its_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "check"
    wide = write_fit(tmp_path, "wide", (0.5, 20.0))  # an untrained byte model's loss is ~5.5
    argv = ["scaling", "check", "--budget", BUDGET, "--out", str(out), "--granularities", "1,2"]
    assert main([*argv[:2], str(wide), *argv[2:], "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["held"] is True and got["budget_flops"] == 4e9 and got["seeds"] == [0, 1]
    assert [r["role"] for r in got["runs"]] == ["optimum", "best_of_largest"]
    for r in got["runs"]:
        lo, hi = r["interval"]
        assert r["held"] is True and lo <= r["measured"] <= hi and len(r["seed_values"]) == 2
        acc = account(
            load_spec(Path(r["dir"]) / "spec.yaml")
        )  # the spec it trained, realized as predict does
        assert r["tokens"] == pytest.approx(4e9 / acc.train_flops_per_token)
        assert r["params"] == acc.params_activated_non_embedding
    assert got["runs"][0]["params"] != got["runs"][1]["params"]  # the law's optimum is the larger size
    trained = stamps(out)
    assert len(trained) == 4  # two configurations x two seeds
    assert json.loads((out / "check.json").read_text())["held"] is True

    # A law whose interval lies far above what trains: exit 1, and the finished runs are read back, not retrained.
    narrow = write_fit(tmp_path, "narrow", (50.0, 60.0))
    assert main([*argv[:2], str(narrow), *argv[2:], "--json"]) == EXIT_FAIL
    captured = capsys.readouterr()
    missed = json.loads(captured.out)
    assert captured.err.count("(finished earlier, reused)") == 4 and "training" not in captured.err
    assert missed["held"] is False and all(r["held"] is False for r in missed["runs"])
    assert [r["seed_values"] for r in missed["runs"]] == [r["seed_values"] for r in got["runs"]]
    assert stamps(out) == trained

    assert main([*argv[:2], str(narrow), *argv[2:]]) == EXIT_FAIL
    text = capsys.readouterr().out
    assert "law did not hold" in text and "the law's optimum" in text and "below" in text


def test_bad_check_inputs_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "check"
    fit = write_fit(tmp_path, "wide", (0.5, 20.0))
    no_samples = write_fit(tmp_path, "none", (0.5, 20.0), samples=0)
    other = write_fit(tmp_path, "other", (0.5, 20.0), study=STUDY.replace("seeds: [0, 1]", "seeds: [3]"))
    (out).mkdir()
    (out / "check.json").write_text(json.dumps({"study": {"train": {}, "objective": {}, "seeds": [9]}}))
    cases = [
        ([str(FIXTURE), "--budget", BUDGET, "--out", str(tmp_path / "a")], "no search spec"),
        ([str(fit), "--budget", "-1", "--out", str(tmp_path / "b")], "--budget"),
        (
            [str(fit), "--budget", BUDGET, "--out", str(tmp_path / "c"), "--granularities", "x"],
            "--granularities",
        ),
        ([str(no_samples), "--budget", BUDGET, "--out", str(tmp_path / "d")], "--resamples"),
        ([str(other), "--budget", BUDGET, "--out", str(out)], "another study"),
        ([str(tmp_path / "missing.json"), "--budget", BUDGET, "--out", str(tmp_path / "e")], "no such file"),
    ]
    for args, words in cases:
        assert main(["scaling", "check", *args]) == EXIT_BAD_INPUT, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, (args, err)


def test_a_budget_below_the_floor_is_refused_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOEFORGE_MIN_STEPS")  # the floor users get
    fit = write_fit(tmp_path, "wide", (0.5, 20.0))
    out = tmp_path / "check"
    assert (
        main(["scaling", "check", str(fit), "--budget", "1e9", "--out", str(out), "--granularities", "1"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget too small" in err
    assert not list(out.glob("trials/*/seed-*"))


def test_fit_reports_decisions_in_the_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scaling", "fit", str(FIXTURE), "--resamples", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["decisions"]
    assert set(d) >= {"law", "smaller_budget", "pairs"} and d["pairs"] == 36 and d["skipped"] == 0
    assert 0 <= d["smaller_budget"] <= d["law"] <= 1
    assert main(["scaling", "fit", str(FIXTURE), "--resamples", "2"]) == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert (
        f"decisions at 1e+12 FLOPs (36 pairs of 9 configurations, seed means): the law orders {d['law']:.0%}"
        in text
    )
    assert f"the 3e+11 budget's ranking {d['smaller_budget']:.0%}" in text
