"""Branched cooldowns on a budget ladder (`train.branch_cooldowns`): the same losses as separate WSD runs,
each budget its own resumable trial, one trainer per stable run across workers, and the switch's checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from moeforge.compiler import SpecError
from moeforge.search import (
    RunConfig,
    TrialRecord,
    ladder_compute,
    load_search,
    load_search_corpus,
    open_storage,
    real_evaluator,
    run_search,
)
from optuna.trial import TrialState

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BUDGETS = "[2.0e+9, 4.0e+9]"  # about 11 and 22 steps of 2 sequences of the debug model
TRAIN = (
    "train: {{device: cpu, batch_size: 2, cpu_threads: 1, eval_points: 2, branch_cooldowns: {branch}, "
    "options: {{eval_tokens: 512, schedule: wsd, warmup_tokens: 512, checkpoint_every_s: 0.0, log_every: 1}}}}\n"
    "seeds: [0, 1]"
)


SPEC = """\
name: {name}
base:
  base: debug
  moe: {{paper: {{experts: 4, top_k: 1, m: 1, shared: 0}}}}
space:
  granularity: [2]
budget: {{train_flops: {budget}}}
sampler: {{kind: grid, seed: 0}}
n_trials: 10
{train}
"""


def _search(tmp: Path, branch: bool, name: str = "t"):
    path = tmp / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, budget=BUDGETS, train=TRAIN.format(branch=str(branch).lower())))
    return load_search(path)


def _run(s, run_dir: Path, evaluate=None):
    evaluate = evaluate or real_evaluator(s, load_search_corpus(s), "cpu")
    return run_search(s, RunConfig(run_dir, plots=False), evaluate=evaluate, log=lambda _: None)


def _trials(run_dir: Path, name: str = "t") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(
        study_name=name, storage=open_storage(str(run_dir / "study.journal"))
    ).get_trials()


def _by_budget(run_dir: Path, name: str = "t") -> dict[float, optuna.trial.FrozenTrial]:
    return {
        t.params["budget"]: t
        for t in _trials(run_dir, name)
        if t.state == TrialState.COMPLETE and t.user_attrs.get("reused_from") is None
    }


def _stable_steps(run_dir: Path) -> dict[str, list[int]]:
    """Per stable run folder (seed): the steps its metrics.jsonl logged, in order."""
    out = {}
    for metrics in sorted((run_dir / "trials").glob("*-stable-*/seed-*/metrics.jsonl")):
        recs = [json.loads(line) for line in metrics.read_text().splitlines()]
        out[str(metrics.parent)] = [r["step"] for r in recs if r.get("kind") == "train"]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same ladder trained as separate WSD runs (branch_cooldowns off)."""
    tmp = tmp_path_factory.mktemp("straight")
    s = _search(tmp, False)
    with pytest.MonkeyPatch.context() as mp:  # module scope: before the suite's function-scoped autouse
        mp.setenv("MOEFORGE_MIN_STEPS", "0")
        _run(s, tmp / "run")
    return {c: t.values[0] for c, t in _by_budget(tmp / "run").items()}, {
        c: t.user_attrs["seed_values"] for c, t in _by_budget(tmp / "run").items()
    }


def test_branched_ladder_equals_separate_wsd_runs_and_saves_compute(tmp_path, straight, capsys):
    s = _search(tmp_path, True)
    out = _run(s, tmp_path / "run")
    assert out.complete == 2
    done = _by_budget(tmp_path / "run")
    values, seed_values = straight
    assert set(done) == set(values) == {2e9, 4e9}
    for c, t in done.items():
        assert t.user_attrs["seed_values"] == pytest.approx(seed_values[c], abs=1e-6)  # bitwise on CPU
        point = t.user_attrs["branch_point"]
        assert 0 < point["tokens"] < t.user_attrs["tokens"] and "-stable-" in point["stable"]
        assert t.user_attrs["trial_dir"].endswith(f"-C{c:.6g}")  # each budget its own unit, as before
        for seed in (0, 1):
            assert (tmp_path / "run" / t.user_attrs["trial_dir"] / f"seed-{seed}" / "summary.json").is_file()
    steps = _stable_steps(tmp_path / "run")
    assert len(steps) == 2  # one stable run per seed, shared by both budgets
    for trained in steps.values():
        assert trained == sorted(set(trained))  # no step trained twice
    assert out.branched_tokens is not None
    trained, separate = out.branched_tokens
    t1, t2 = (done[c].user_attrs["tokens"] for c in (2e9, 4e9))
    b1, b2 = (done[c].user_attrs["branch_point"]["tokens"] for c in (2e9, 4e9))
    assert (trained, separate) == (2 * (b2 + (t1 - b1) + (t2 - b2)), 2 * (t1 + t2))
    # every budget has finished: the stable runs' checkpoints are pruned (keep_checkpoints: best)
    assert not list((tmp_path / "run" / "trials").glob("*-stable-*/seed-*/branches"))
    # `search report` says what the study saved
    from moeforge.cli import main

    assert main(["search", "report", str(tmp_path / "run"), "--no-plots", "--wide"]) == 0
    saved = 1 - trained / separate
    assert f"{trained:,} tokens trained where separate runs would train {separate:,} ({saved:.0%} saved)" in (
        capsys.readouterr().out
    )


def test_each_budget_is_its_own_resumable_unit(tmp_path, straight):
    """Killed in the second budget's cooldown: the first budget's trial is kept, the stable run is not trained
    again, the second budget resumes from its own checkpoint; the values are the uninterrupted ones."""
    s = _search(tmp_path, True)
    real = real_evaluator(s, load_search_corpus(s), "cpu")
    seen: list[float] = []

    def killed_in_second_budget(spec, seed, budget, out_dir, on_eval):
        if budget not in seen:
            seen.append(budget)

        def stop(fraction, metrics):
            if len(seen) == 2 and fraction == 1.0:
                raise KeyboardInterrupt
            on_eval(fraction, metrics)

        return real(spec, seed, budget, out_dir, stop)

    with pytest.raises(KeyboardInterrupt):
        _run(s, tmp_path / "run", killed_in_second_budget)
    first = _by_budget(tmp_path / "run")
    assert list(first) == [seen[0]]
    summary0 = tmp_path / "run" / first[seen[0]].user_attrs["trial_dir"] / "seed-0" / "summary.json"
    before = summary0.read_text()
    assert list((tmp_path / "run" / "trials").glob("*-stable-*/seed-0/branches"))  # kept: a budget needs it
    steps_before = _stable_steps(tmp_path / "run")
    out = _run(s, tmp_path / "run", real)
    assert out.complete == 2
    done = _by_budget(tmp_path / "run")
    assert done[seen[0]].number == first[seen[0]].number and summary0.read_text() == before  # reused
    values, _ = straight
    for c in values:
        assert done[c].values[0] == pytest.approx(values[c], abs=1e-6)
    after = _stable_steps(tmp_path / "run")
    for run, trained in after.items():
        assert trained == sorted(set(trained))
        assert trained[: len(steps_before.get(run, []))] == steps_before.get(run, [])
    cut = tmp_path / "run" / done[seen[1]].user_attrs["trial_dir"] / "seed-0" / "summary.json"
    assert len(json.loads(cut.read_text())["segments"]) >= 2  # the cooldown resumed, not started over


@pytest.mark.slow
def test_two_workers_train_each_stable_run_once(tmp_path, straight):
    """`--workers 2` on one journal: the two budgets of the one architecture run at the same time in two
    processes; each stable run is trained by one of them at a time, and the values are the separate runs'."""
    _search(tmp_path, True)  # writes t.yaml
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "moeforge", "search", str(tmp_path / "t.yaml"), "--out", str(run_dir)]
    r = subprocess.run([*cmd, "--workers", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    done = _by_budget(run_dir)
    assert {t.user_attrs["worker"] for t in done.values()} == {0, 1}  # in two processes
    values, _ = straight
    for c in values:
        assert done[c].values[0] == pytest.approx(values[c], abs=1e-6)
    steps = _stable_steps(run_dir)
    assert len(steps) == 2
    for trained in steps.values():
        assert trained == sorted(set(trained)), trained  # never two trainers on one stable run


@pytest.mark.parametrize(
    ("budget", "options", "says"),
    [
        ("2.0e+9", "{schedule: wsd, warmup_tokens: 512}", "needs a budget ladder"),
        (BUDGETS, "{warmup_tokens: 512}", "schedule: wsd"),
        (BUDGETS, "{schedule: wsd}", "warmup_tokens"),
        (BUDGETS, "{schedule: wsd, warmup_tokens: 512, cooldown: 0}", "needs a cooldown"),
    ],
)
def test_the_switch_says_what_it_needs(make_search, budget, options, says):
    with pytest.raises(SpecError) as e:
        make_search(
            "  granularity: [2]",
            budget=budget,
            extra=f"train: {{branch_cooldowns: true, options: {options}}}",
        )
    assert any(p.key.startswith("train.branch_cooldowns") and says in p.message for p in e.value.problems), [
        (p.key, p.message) for p in e.value.problems
    ]


def test_ladder_compute_counts_one_stable_phase_per_run():
    def rec(tokens, b, stable="k-stable-x", seeds=(0, 1)):
        point = {"stable": stable, "tokens": b} if b is not None else None
        return TrialRecord(number=0, state="COMPLETE", tokens=tokens, seeds=list(seeds), branch_point=point)

    assert ladder_compute([rec(100, None)]) is None
    got = ladder_compute([rec(100, 80), rec(200, 160), rec(400, 320), rec(50, None, seeds=(0,))])
    assert got == (2 * (320 + 20 + 40 + 80) + 50, 2 * 700 + 50)


def _one_budget(spec_dir: str, budget: float, barrier, results) -> None:
    """In a fresh process: train seed 0 of one budget of the ladder in spec_dir/run (no study)."""
    from moeforge.search import trial_to_spec
    from moeforge.search._space import spec_key
    from moeforge.search._trials import trial_dir

    s = load_search(Path(spec_dir) / "t.yaml")
    evaluate = real_evaluator(s, load_search_corpus(s), "cpu")
    spec = trial_to_spec(s, {"m": 2, "budget": budget})
    out = trial_dir(Path(spec_dir) / "run", f"{spec_key(spec)}-C{budget:.6g}") / "seed-0"
    barrier.wait()  # both processes reach the stable run at once
    results.put((budget, evaluate(spec, 0, budget, out, lambda *_: None).final_val_loss))


@pytest.mark.slow
def test_two_processes_at_once_share_one_stable_run(tmp_path, straight):
    """Two budgets of one architecture start in two processes at the same moment: the stable run is
    trained under its lock by one at a time (never two trainers on one folder), and each budget's loss is
    its separate run's."""
    import multiprocessing

    _search(tmp_path, True)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_one_budget, args=(str(tmp_path), c, barrier, results)) for c in (2e9, 4e9)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    _, seed_values = straight
    assert got == pytest.approx({c: v[0] for c, v in seed_values.items()}, abs=1e-6)
    steps = _stable_steps(tmp_path / "run")
    assert len(steps) == 1
    for trained in steps.values():
        assert trained == sorted(set(trained)), trained
