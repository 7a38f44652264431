"""The worker loop: infeasible proposals are not trained and not counted, repeats reuse results,
the trial cap is global, failures are recorded, and real training meets its FLOPs budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import moeforge.search._run as run_mod
import optuna
import pytest
from moeforge.search import (
    RunConfig,
    TrialFailed,
    WorkerOptions,
    counted,
    fake_evaluator,
    make_sampler,
    run_search,
    run_worker,
)
from moeforge.search._run import make_pruner
from optuna.trial import TrialState


def _study(s):
    return optuna.create_study(directions=s.directions, sampler=make_sampler(s), pruner=make_pruner(s))


def _counting(evaluate):
    calls = []

    def f(spec, seed, budget, out_dir, on_eval):
        calls.append((spec, seed))
        return evaluate(spec, seed, budget, out_dir, on_eval)

    return f, calls


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_infeasible_proposals_are_recorded_not_trained_not_counted(make_search, tmp_path, sampler):
    # m=4 specs exceed the parameter cap; m=1 with K_s=1 is not a valid spec.
    s = make_search(n_trials=3, sampler=sampler, extra="constraints: {max_params_total: 264000}")
    study = _study(s)
    evaluate, calls = _counting(fake_evaluator(0))
    trained = run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=lambda _: None))
    trials = study.get_trials()
    infeasible = [t for t in trials if t.user_attrs.get("infeasible")]
    bad = {(t.params["m"], t.params["K_s"]) for t in infeasible}
    assert bad == {(4, 0), (4, 1), (1, 1)} if sampler == "grid" else bad <= {(4, 0), (4, 1), (1, 1)}
    for t in infeasible:
        assert t.state == TrialState.PRUNED and max(t.user_attrs["constraints"]) > 0
        assert not t.user_attrs.get("counted")
    assert trained == len(calls) == 3 == len(counted(trials))
    assert all(spec.moe_derived.m != 4 for spec, _ in calls)
    # a constraint-aware sampler sees them through Optuna's constraint API
    if sampler == "tpe":
        assert all(max(t.constraints.values()) > 0 for t in infeasible)
        assert any(t.user_attrs.get("infeasible") for t in study.get_trials())


def test_repeated_spec_reuses_result(make_search, tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "MAX_SKIPS", 15)
    s = make_search("  granularity: [2]\n  shared: [0, 1]", sampler="random", n_trials=5)
    study = _study(s)
    evaluate, calls = _counting(fake_evaluator(0))
    run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=lambda _: None))
    assert len(calls) == 2  # two distinct specs in the space: each trained once
    reused = [t for t in study.get_trials() if "reused_from" in t.user_attrs]
    assert reused, "the random sampler must have repeated a spec"
    by_number = {t.number: t for t in study.get_trials()}
    for t in reused:
        orig = by_number[t.user_attrs["reused_from"]]
        assert t.params == orig.params and t.values == orig.values and not t.user_attrs.get("counted")


def test_failed_training_is_recorded_and_the_search_goes_on(make_search, tmp_path):
    s = make_search(n_trials=4)
    study = _study(s)
    good = fake_evaluator(0)

    def evaluate(spec, seed, budget, out_dir, on_eval):
        if spec.moe_derived.m == 2:
            raise TrialFailed("diverged: loss is nan")
        return good(spec, seed, budget, out_dir, on_eval)

    run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=lambda _: None))
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs["fail_reason"].startswith("diverged") for t in failed)
    assert len(counted(study.get_trials())) == 4
    assert any(t.state == TrialState.COMPLETE for t in study.get_trials())


def test_seeds_mean_and_spread(make_search, tmp_path):
    s = make_search("  granularity: [2]", n_trials=1, extra="seeds: [0, 1, 2]")
    study = _study(s)
    run_worker(s, study, fake_evaluator(0), WorkerOptions(tmp_path, log=lambda _: None))
    (t,) = study.get_trials()
    vals = t.user_attrs["seed_values"]
    assert len(vals) == 3 and t.value == pytest.approx(sum(vals) / 3) and t.user_attrs["value_std"] > 0


def test_pruner_reports_at_fractions(make_search, tmp_path):
    s = make_search(
        "  granularity: [1, 2, 4]",
        n_trials=3,
        extra="pruner: {kind: median, n_startup_trials: 1, n_warmup_steps: 0}",
    )
    study = _study(s)
    run_worker(s, study, fake_evaluator(0), WorkerOptions(tmp_path, log=lambda _: None))
    trials = study.get_trials()
    for t in trials:
        assert set(t.intermediate_values) <= {1, 2, 3, 4} and t.intermediate_values
    worst = next(t for t in trials if t.params["m"] == 1)  # worst at every fraction of the budget
    assert (worst.state == TrialState.PRUNED) == (worst.number > 0)
    if worst.number > 0:
        assert len(worst.intermediate_values) == 1


@pytest.mark.slow
def test_real_training_meets_budget(make_search, tmp_path):
    s = make_search(
        "  granularity: [1, 4]",
        budget="2.0e+9",
        n_trials=2,
        extra="train: {device: cpu, batch_size: 4, eval_points: 2, cpu_threads: 1, options: {eval_tokens: 1024}}",
    )
    out = run_search(s, RunConfig(tmp_path / "run", plots=False), log=lambda _: None)
    records = json.loads((tmp_path / "run" / "trials.json").read_text())
    done = [r for r in records if r["state"] == "COMPLETE"]
    assert len(done) == 2 == out["complete"]
    for r in done:
        assert abs(r["train_flops"] / r["budget_flops"] - 1) < 0.01
        assert r["train_flops"] <= r["budget_flops"]
        assert r["tokens"] * r["forward_flops_per_token"] * 3 == r["train_flops"]
        assert r["load"] is not None
    # best.yaml validates and reports as is
    from moeforge.compiler import account, load_spec

    best = load_spec(tmp_path / "run" / "best.yaml")
    assert account(best).params_total == min(done, key=lambda r: r["value"])["params_total"]


def _count_done(journal: Path) -> int:
    from moeforge.search import open_storage

    try:
        study = optuna.load_study(study_name="t", storage=open_storage(str(journal)))
    except Exception:
        return 0
    return sum(t.state == TrialState.COMPLETE for t in study.get_trials())


@pytest.mark.slow
def test_resume_after_kill(make_search, tmp_path):
    spec_path = tmp_path / "t.yaml"
    make_search(n_trials=4)  # writes t.yaml
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "moeforge",
        "search",
        str(spec_path),
        "--out",
        str(run_dir),
        "--no-plots",
        "--fake-objective",
        "0.8",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while _count_done(run_dir / "study.journal") < 2 and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    from moeforge.search import open_storage

    study = optuna.load_study(study_name="t", storage=open_storage(str(run_dir / "study.journal")))
    first = {t.number: t.values for t in study.get_trials() if t.state == TrialState.COMPLETE}
    cut = [t.number for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert 2 <= len(first) < 4
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    records = json.loads((run_dir / "trials.json").read_text())
    assert sum(rec["counted"] and rec["state"] != "FAIL" for rec in records) == 4
    done = {rec["number"]: rec["values"] for rec in records if rec["state"] == "COMPLETE"}
    assert all(done[n] == v for n, v in first.items())  # finished trials kept as they were
    died = [rec for rec in records if rec["died"]]
    assert [rec["number"] for rec in died] == cut
    for rec in died:  # a trial cut off by the kill is failed and queued again with its params
        assert any(o["retry_of"] == rec["number"] and o["params"] == rec["params"] for o in records)
