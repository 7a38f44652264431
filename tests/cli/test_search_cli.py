"""moeforge search: bad specs exit 2 with located errors; report --json; schema --search; --workers."""

import json
from pathlib import Path

import pytest

from moeforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "tests" / "fixtures" / "search" / "tiny.yaml").read_text()  # a 2-trial search of seconds


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        (GOOD.replace("n_trials: 2", "n_trails: 2"), ":10:1: n_trails", "did you mean 'n_trials'"),
        (
            GOOD.replace("granularity: [1, 2]", "params: {moe.top_kk: {int: {low: 1, high: 2}}}"),
            ":7:12: space.params.moe.top_kk",
            "did you mean 'top_k'",
        ),
        (GOOD.replace("base: debug", "base: no-such-model"), ":3:3: base.base", "no such file"),
        (GOOD.replace("{kind: grid}", "{kind: bayes}"), ":9:", "sampler.kind"),
        (
            GOOD.replace("granularity: [1, 2]", "params: {d_model: {uniform: [1, 2]}}"),
            ":7:",
            "space.params.d_model",
        ),
        (
            GOOD.replace(
                "paper: {experts: 4, top_k: 1, m: 1, shared: 0}", "routed_experts: 4, top_k: 1"
            ).replace(
                "moe: {routed_experts: null, shared_experts: null, top_k: null, expert_hidden: null,\n        ",
                "moe: {",
            ),
            ":6:3: space.granularity",
            "paper form",
        ),
    ],
)
def test_bad_search_specs_exit_2_with_located_errors(tmp_path, capsys, text, where, what):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    assert main(["search", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{p}{where}" in err and what in err
    assert "Traceback" not in err


def test_search_then_report_json(tmp_path, capsys):
    p = tmp_path / "cli.yaml"
    p.write_text(GOOD)
    run = tmp_path / "run"
    assert main(["search", str(p), "--out", str(run), "--json", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counted"] == 2 and summary["complete"] == 2 and summary["workers"] == 1
    for name in (
        "trials.json",
        "trials.csv",
        "best.yaml",
        "plots/history.png",
        "plots/history.html",
        "plots/loss_vs_m.png",
    ):
        assert (run / name).is_file(), name
    assert main(["search", "report", str(run), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["trials"] == json.loads((run / "trials.json").read_text())
    assert main(["report", str(run / "best.yaml"), "--json"]) == 0  # best.yaml reports as is
    assert json.loads(capsys.readouterr().out)["params"]["total"] == summary["best"]["params_total"]
    # the same command again resumes: nothing left to do, nothing retrained
    before = (run / "trials.json").read_text()
    assert main(["search", str(p), "--out", str(run), "--json", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["trials"] == 2
    assert json.loads((run / "trials.json").read_text()) == json.loads(before)


def test_report_errors(tmp_path, capsys):
    assert main(["search", "report", str(tmp_path)]) == 2
    assert "not a search run dir" in capsys.readouterr().err


def test_schema_matches_shipped_file(capsys):
    assert main(["schema", "--search"]) == 0
    shipped = json.loads((ROOT / "specs" / "schema" / "search.schema.json").read_text())
    assert json.loads(capsys.readouterr().out) == shipped


@pytest.mark.slow
def test_workers_cover_the_grid_and_share_the_cap(tmp_path, capsys):
    """Two worker processes, real training: every feasible grid point trains exactly once."""
    p = tmp_path / "cli.yaml"
    p.write_text(
        GOOD.replace("granularity: [1, 2]", "granularity: [1, 2, 4]\n  shared: [0, 1]").replace(
            "n_trials: 2", "n_trials: 5"
        )
    )
    run = tmp_path / "run"
    assert main(["search", str(p), "--out", str(run), "--workers", "2", "--json", "--no-plots"]) == 0
    records = json.loads((run / "trials.json").read_text())
    numbers = [r["number"] for r in records]
    assert len(numbers) == len(set(numbers))
    trained = [r for r in records if r["counted"] and r["state"] == "COMPLETE"]
    assert len(trained) == 5 and {r["worker"] for r in trained} == {0, 1}
    assert sorted((r["m"], r["shared_experts"]) for r in trained) == [(1, 0), (2, 0), (2, 1), (4, 0), (4, 1)]
    assert not (run / "plots").exists()


def test_data_infeasible_proposal_is_not_a_crash(tmp_path, capsys):
    """The issue's first report: vocab_size 64 on the byte-level corpus escaped as a DataError traceback."""
    p = tmp_path / "cli.yaml"
    p.write_text(GOOD.replace("granularity: [1, 2]", "params: {vocab_size: {categorical: [64, 256]}}"))
    run = tmp_path / "run"
    assert main(["search", str(p), "--out", str(run), "--no-plots", "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "vocab_size 64 is smaller than the data's token range" in " ".join(out.split())
    records = json.loads((run / "trials.json").read_text())
    assert [r["params"]["vocab_size"] for r in records if r["state"] == "COMPLETE"] == [256]


def test_no_completed_trial_exits_1_with_results(tmp_path, capsys):
    p = tmp_path / "cli.yaml"
    p.write_text(GOOD + "constraints: {max_params_total: 1000}\n")
    run = tmp_path / "run"
    assert main(["search", str(p), "--out", str(run), "--no-plots"]) == 1  # workers auto: 2 processes here
    assert "no trial completed" in capsys.readouterr().err
    assert (run / "trials.json").is_file()


def test_trials_that_really_diverge_are_recorded_and_retried_once(tmp_path, capsys):
    """Real training with an absurd learning rate: every trial diverges. Each spec is tried twice (the
    second failure of the same kind is final), results are written, and no completed trial means exit 1."""
    p = tmp_path / "cli.yaml"
    p.write_text(GOOD.replace("cpu_threads: 1,", "cpu_threads: 1, lr: 1.0e+6,"))
    run = tmp_path / "run"
    assert main(["search", str(p), "--out", str(run), "--no-plots", "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "trial(s) failed" in err and "no trial completed" in err
    records = json.loads((run / "trials.json").read_text())
    assert len(records) == 4 and all(r["state"] == "FAIL" for r in records)
    assert all(r["fail_reason"].startswith("diverged: ") and r["fail_kind"] == "Diverged" for r in records)
    assert sum(r["retried"] is True for r in records) == 2 and sum(r["counted"] for r in records) == 2
    for r in records:
        assert (run / r["traceback"]).is_file()
