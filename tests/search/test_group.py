"""`train.devices_per_trial: k`: a trial trains as a torchrun group of k processes (gloo on CPU here) and
gets the result one process gets with the same global batch; workers partition devices into groups."""

import json

import moeforge.search._driver as driver
import optuna
import pytest
from moeforge.compiler import SpecError
from moeforge.search import (
    WorkerOptions,
    auto_workers,
    load_search_corpus,
    make_sampler,
    real_evaluator,
    run_worker,
)
from moeforge.search._samplers import make_pruner


@pytest.mark.slow
def test_a_trial_on_two_processes_matches_one(make_search, tmp_path):
    extra = (
        "train: {device: cpu, cpu_threads: 1, batch_size: 8, eval_points: 2, options: {eval_tokens: 2048}}"
    )
    two = make_search(
        "  granularity: [2]",
        n_trials=1,
        extra=extra.replace("cpu_threads: 1", "cpu_threads: 1, devices_per_trial: 2"),
        budget="2.0e+9",
    )
    one = make_search("  granularity: [2]", n_trials=1, extra=extra, name="one", budget="2.0e+9")
    values = {}
    for s, out in ((two, tmp_path / "two"), (one, tmp_path / "one")):
        study = optuna.create_study(directions=s.directions, sampler=make_sampler(s), pruner=make_pruner(s))
        logs: list[str] = []
        corpus = load_search_corpus(s)
        run_worker(s, study, real_evaluator(s, corpus), WorkerOptions(out, log=logs.append, corpus=corpus))
        (t,) = study.get_trials()
        assert t.state == optuna.trial.TrialState.COMPLETE, logs
        values[s.name] = t.values[0]
        summary = json.loads(next(out.glob("trials/*/seed-0/summary.json")).read_text())
        assert summary["tokens"] == t.user_attrs["tokens"]
        if s is two:
            assert summary["world"] == 2
            assert any("50% of budget" in line for line in logs)  # evaluations replayed from metrics.jsonl
    assert values["t"] == pytest.approx(values["one"], abs=1e-4)


def test_groups_refuse_a_pruner_and_partition_workers(make_search, monkeypatch):
    with pytest.raises(SpecError, match="reports its evaluations when it ends"):
        make_search(extra="train: {devices_per_trial: 2}\npruner: {kind: median}")
    s = make_search(n_trials=8, extra="train: {devices_per_trial: 2}")
    monkeypatch.setattr(driver, "_gpus", lambda: [str(i) for i in range(8)])
    assert auto_workers(s, "cuda") == 4
    s1 = make_search(n_trials=8, extra="train: {devices_per_trial: 3}")
    assert auto_workers(s1, "cuda") == 2  # 8 GPUs make two groups of 3; two are left idle
