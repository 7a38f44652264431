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


# What torchrun wrote to stderr when rank 0 raised IndexError and rank 1 ImportError (torch 2.x, trimmed).
TORCHRUN_STDERR = """\
*****************************************
Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system being overloaded, please further tune the variable for optimal performance in your application as needed.
*****************************************
Traceback (most recent call last):
  File "/tmp/grp/boom.py", line 3, in <module>
    raise IndexError("list index out of range")
IndexError: list index out of range
Traceback (most recent call last):
  File "/tmp/grp/boom.py", line 4, in <module>
    raise ImportError("cannot import name x")
ImportError: cannot import name x
E1207 11:02:32.548000 9790 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 9909) of binary: python
W1207 11:02:32.549000 9790 torch/distributed/elastic/multiprocessing/api.py:900] Sending process 9911 closing signal SIGTERM
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
boom.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_11:02:32
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 9909)
============================================================
"""


@pytest.mark.parametrize(
    ("stderr", "why"),
    [
        (TORCHRUN_STDERR, "IndexError: list index out of range"),
        (TORCHRUN_STDERR.replace("IndexError", "KeyError"), "KeyError: list index out of range"),
        (
            "[rank0]: Traceback (most recent call last):\n[rank0]: ImportError: no module x\n",
            "ImportError: no module x",
        ),
        ("W1207 11:02:32 api.py:900] Sending process 1 closing signal SIGTERM\n", "exit status 1"),
        (
            "I1207 starting\nSegmentation fault (core dumped)\nW1207 closing\n",
            "Segmentation fault (core dumped)",
        ),
    ],
)
def test_a_failed_groups_reason_is_the_processes_exception(stderr, why):
    from moeforge.search._evaluate import group_failure

    assert group_failure(stderr, 1) == why
