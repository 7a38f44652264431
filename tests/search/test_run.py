"""The worker loop: infeasible proposals are not trained and not counted, repeats reuse results,
the trial cap is global, any failure is recorded and retried once, data-dependent infeasibility, resume
from a trial's own checkpoint, and real training meets its FLOPs budget."""

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import moeforge.search._heartbeat as heartbeat_mod
import moeforge.search._worker as worker_mod
import optuna
import pytest
from fakes import command, fake_evaluator, fake_summary
from moeforge.search import (
    RunConfig,
    SearchStop,
    TrialFailed,
    WorkerOptions,
    counted,
    load_search_corpus,
    make_sampler,
    real_evaluator,
    run_search,
    run_worker,
)
from moeforge.search._samplers import make_pruner
from moeforge.search._trials import MAX_ATTEMPTS
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
    monkeypatch.setattr(worker_mod, "MAX_SKIPS", 15)
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


class _Kernel(RuntimeError):
    pass


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (TrialFailed("diverged: loss is nan"), "TrialFailed"),
        (_Kernel("CUDA error: an illegal memory access was encountered\nmore lines"), "_Kernel"),
        (KeyError("a bug"), "KeyError"),
    ],
)
def test_any_failure_is_recorded_retried_once_and_the_search_goes_on(make_search, tmp_path, error, kind):
    s = make_search(n_trials=4)
    study = _study(s)
    good = fake_evaluator(0)
    calls = []

    def evaluate(spec, seed, budget, out_dir, on_eval):
        calls.append(spec.moe_derived.m)
        if spec.moe_derived.m == 2:
            raise error
        return good(spec, seed, budget, out_dir, on_eval)

    run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=lambda _: None))
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # each m=2 spec failed twice the same way: tried, retried once, then given up
    assert len(failed) == 2 * len({t.user_attrs["spec_key"] for t in failed})
    for t in failed:
        reason = t.user_attrs["fail_reason"]
        assert "\n" not in reason and t.user_attrs["fail_kind"] == kind
        tb = tmp_path / t.user_attrs["traceback"]
        assert tb.is_file() and "Traceback" in tb.read_text()
        assert tb.parent == tmp_path / "trials" / t.user_attrs["spec_key"]
    retried = [t for t in failed if t.user_attrs.get("retried")]
    assert len(retried) == len(failed) // 2
    assert all(any(o.user_attrs.get("retry_of") == t.number for o in trials) for t in retried)
    # exactly n_trials count: the final attempt of each spec, failed or not
    assert len(counted(trials)) == 4
    assert any(t.state == TrialState.COMPLETE for t in trials)


def test_a_different_failure_is_retried_again(make_search, tmp_path):
    s = make_search("  granularity: [2]", n_trials=1)
    study = _study(s)
    errors = [RuntimeError("first"), MemoryError("second"), ValueError("third")]

    def evaluate(spec, seed, budget, out_dir, on_eval):
        raise errors.pop(0)

    run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=lambda _: None))
    kinds = [t.user_attrs["fail_kind"] for t in study.get_trials()]
    assert kinds == ["RuntimeError", "MemoryError", "ValueError"][:MAX_ATTEMPTS]
    assert len(counted(study.get_trials())) == 1


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
    done = [r for r in records if r["state"] == "COMPLETE" and r["reused_from"] is None]
    assert len(done) == 2 == out.complete
    for r in done:
        assert abs(r["train_flops"] / r["budget_flops"] - 1) < 0.01
        assert r["train_flops"] <= r["budget_flops"]
        assert r["tokens"] * r["forward_flops_per_token"] * 3 == r["train_flops"]
        assert r["load"] is not None
    # best.yaml validates and reports as is
    from moeforge.compiler import account, load_spec

    best = load_spec(tmp_path / "run" / "best.yaml")
    assert account(best).params_total == min(done, key=lambda r: r["value"])["params_total"]


def _load(run_dir: Path, name: str = "t") -> optuna.Study:
    from moeforge.search import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(str(run_dir / "study.journal")))


def _training(run_dir: Path) -> tuple[int, bool]:
    """(trials done, whether a trial is training right now) of the journal in run_dir."""
    try:
        trials = _load(run_dir).get_trials()
    except Exception:
        return 0, False
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    return done, any(t.state == TrialState.RUNNING and t.user_attrs.get("counted") for t in trials)


@pytest.mark.slow
def test_resume_after_kill(make_search, tmp_path):
    make_search(n_trials=4)  # writes t.yaml
    run_dir = tmp_path / "run"
    cmd = command(tmp_path / "t.yaml", run_dir, 2.0)
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-trial, after two trials finished
        done, busy = _training(run_dir)
        if done >= 2 and busy:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    study = _load(run_dir)
    first = {t.number: t.values for t in study.get_trials() if t.state == TrialState.COMPLETE}
    cut = [t.number for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert 2 <= len(first) < 4 and cut, (len(first), cut)
    # a kill during a journal write leaves its lock file, which Optuna breaks after its 30 s grace period
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trials = _load(run_dir).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(counted(trials)) == 4 and all(t.state == TrialState.COMPLETE for t in counted(trials))
    done = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    assert all(done[n] == v for n, v in first.items())  # finished trials kept as they were
    by_number = {t.number: t for t in trials}
    for n in cut:  # a trial cut off by the kill is failed and queued again with its params
        assert by_number[n].state == TrialState.FAIL
        assert any(t.user_attrs.get("retry_of") == n and t.params == by_number[n].params for t in trials)


def test_data_dependent_infeasibility_trains_nothing(make_search, tmp_path):
    """A vocabulary below the data's token range and a seq_len the validation split cannot fill are
    infeasible before anything is built (the first used to escape as a DataError traceback)."""
    text = tmp_path / "small.txt"
    text.write_bytes(bytes(range(256)) * 12)  # 3072 bytes: 1536 validation tokens (half, at most)
    s = make_search(
        "  params:\n    vocab_size: {categorical: [64, 256]}\n    seq_len: {categorical: [128, 2048]}",
        n_trials=2,  # more than the one feasible point: the grid is walked to its end
        extra=f"train: {{data: {text}}}",
    )
    corpus = load_search_corpus(s)
    study = _study(s)
    evaluate, calls = _counting(fake_evaluator(0))
    run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=lambda _: None, corpus=corpus))
    assert len(calls) == 1 and (calls[0][0].vocab_size, calls[0][0].seq_len) == (256, 128)
    why = {
        (t.params["vocab_size"], t.params["seq_len"]): t.user_attrs.get("infeasible")
        for t in study.get_trials()
    }
    assert "vocab_size 64 is smaller than the data's token range (256 ids" in why[(64, 128)]
    assert "seq_len 2048 needs 2049 validation tokens; the data has 1536" in why[(256, 2048)]
    for t in study.get_trials():
        if t.user_attrs.get("infeasible"):
            assert (
                t.state == TrialState.PRUNED
                and t.constraints["fits_data"] > 0
                and not t.user_attrs.get("counted")
            )
    trained = next(t for t in study.get_trials() if t.state == TrialState.COMPLETE)
    assert trained.user_attrs["data_fingerprint"] == corpus.fingerprint


@pytest.mark.slow
def test_interrupted_trial_resumes_from_its_own_checkpoint(make_search, tmp_path):
    """Real training: a trial interrupted half-way is retried from its checkpoint (not from step 0) and
    ends exactly where an uninterrupted run of the same spec and seed ends."""
    train = "train: {device: cpu, batch_size: 2, eval_points: 4, cpu_threads: 1, options: {eval_tokens: 512, checkpoint_every_s: 0.0}}"
    s = make_search("  granularity: [2]", budget="4.0e+9", n_trials=1, extra=train)
    corpus = load_search_corpus(s)
    real = real_evaluator(s, corpus, "cpu")
    cut = []

    def interrupted(spec, seed, budget, out_dir, on_eval):
        def stop_half_way(fraction, metrics):
            if fraction >= 0.5 and not cut:
                cut.append(fraction)
                raise KeyboardInterrupt
            on_eval(fraction, metrics)

        return real(spec, seed, budget, out_dir, stop_half_way)

    with pytest.raises(KeyboardInterrupt):
        run_search(s, RunConfig(tmp_path / "run", plots=False), evaluate=interrupted, log=lambda _: None)
    out = run_search(s, RunConfig(tmp_path / "run", plots=False), evaluate=real, log=lambda _: None)
    assert out.complete == 1
    trials = _load(tmp_path / "run").get_trials()
    first, retry = trials[0], trials[-1]
    assert first.state == TrialState.FAIL and first.user_attrs["died"] == "interrupted"
    assert retry.user_attrs["retry_of"] == first.number and retry.state == TrialState.COMPLETE
    summary = json.loads(
        (tmp_path / "run" / retry.user_attrs["trial_dir"] / "seed-0" / "summary.json").read_text()
    )
    assert len(summary["segments"]) == 2  # resumed, not started over
    whole = run_search(s, RunConfig(tmp_path / "whole", plots=False), evaluate=real, log=lambda _: None)
    assert retry.values[0] == pytest.approx(whole.best.value, abs=1e-6)
    assert summary["tokens"] == whole.best.tokens


@pytest.mark.slow
def test_two_workers_proposing_one_spec_train_it_once(make_search, tmp_path):
    """Two processes on one journal whose samplers have the same seed propose the same specs in the same
    order: each spec is trained by one of them, the other waits and reuses it (not counted), and the
    five feasible specs of the space are each trained exactly once."""
    make_search("  granularity: [1, 2, 4]\n  shared: [0, 1]", n_trials=5, sampler="random")
    run_dir = tmp_path / "run"
    cmd = command(tmp_path / "t.yaml", run_dir, 1.0)
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    trials = _load(run_dir).get_trials()
    real = counted(trials)
    keys = [t.user_attrs["spec_key"] for t in real]
    assert len(real) == 5 and len(set(keys)) == 5  # every feasible grid point, each trained once
    assert {(t.params["m"], t.params["K_s"]) for t in real} == {(1, 0), (2, 0), (2, 1), (4, 0), (4, 1)}
    reused = [t for t in trials if t.user_attrs.get("reused_from") is not None]
    assert reused, "both workers propose the same first spec"
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_worker_with_other_data_refuses_to_join(make_search, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 400)
    s = make_search("  granularity: [1, 2]", n_trials=1, extra=f"train: {{data: {text}}}")
    cfg = RunConfig(tmp_path / "run", plots=False)
    run_search(s, cfg, evaluate=fake_evaluator(0), log=lambda _: None)
    text.write_bytes(b"def g(y):\n    return y * 2\n" * 400)  # same path, other tokens
    with pytest.raises(SearchStop, match="trains on data with fingerprint .* this machine's data has"):
        run_search(s, cfg, evaluate=fake_evaluator(0), log=lambda _: None)
    (rec,) = [
        r for r in json.loads((tmp_path / "run" / "trials.json").read_text()) if r["state"] == "COMPLETE"
    ]
    assert rec["data_fingerprint"] == _load(tmp_path / "run").user_attrs["data"]["fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["best", "all"])
def test_finished_trials_keep_checkpoints_by_policy(make_search, tmp_path, policy):
    train = (
        "train: {device: cpu, batch_size: 4, eval_points: 1, cpu_threads: 1, "
        f"keep_checkpoints: {policy}, options: {{eval_tokens: 512}}}}"
    )
    s = make_search("  granularity: [1, 2, 4]", n_trials=3, extra=train)
    out = run_search(s, RunConfig(tmp_path / "run", workers=1, plots=False), log=lambda _: None)
    records = json.loads((tmp_path / "run" / "trials.json").read_text())
    with_weights = {
        r["number"]
        for r in records
        if list((tmp_path / "run" / r["trial_dir"]).glob("seed-*/checkpoint/model.safetensors"))
    }
    assert all((tmp_path / "run" / r["trial_dir"] / "seed-0" / "summary.json").is_file() for r in records)
    assert with_weights == ({out.best.number} if policy == "best" else {r["number"] for r in records})


def test_a_trial_whose_worker_died_right_after_ask_is_failed_and_retried(make_search, tmp_path, monkeypatch):
    """Killed between ask and recording its pid: no pid check or heartbeat finds it, its age does."""
    s = make_search(n_trials=1)
    study = _study(s)
    orphan = study.ask()  # what a worker killed right after ask leaves behind
    assert heartbeat_mod.reap_dead(study) == []  # young: its worker may still be starting it
    monkeypatch.setattr(heartbeat_mod, "ORPHAN_S", 0.0)
    assert heartbeat_mod.reap_dead(study) == [orphan.number]
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[-1].state == TrialState.WAITING and trials[-1].user_attrs["retry_of"] == orphan.number


def test_a_dead_workers_retry_keeps_its_checkpoint_on_the_journal(make_search, tmp_path):
    """The default journal finds a dead worker by its pid: its trial is failed and queued again with its
    spec_key and marked retried, so pruning checkpoints (keep_checkpoints: best) leaves the folder the
    retry resumes from."""
    import sys

    from moeforge.search import open_storage, open_study
    from moeforge.search._checkpoints import prune_checkpoints

    s = make_search(n_trials=4)
    run_dir = tmp_path / "run"
    url = str(run_dir / "study.journal")
    storage = open_storage(url)
    study = open_study(s, url, "t", storage=storage)
    best = study.ask()
    best.set_user_attr("spec_key", "best-spec")
    study.tell(best, [1.0])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    cut = study.ask()
    for k, v in {
        "spec_key": "cut-spec",
        "counted": True,
        "host": socket.gethostname(),
        "pid": gone.pid,
    }.items():
        cut.set_user_attr(k, v)
    ckpt = run_dir / "trials" / "cut-spec" / "seed-0" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")

    assert heartbeat_mod.reap_dead(study, storage) == [cut.number]
    trials = study.get_trials()
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == cut.number
    assert retry.user_attrs["spec_key"] == "cut-spec"
    assert trials[cut.number].state == TrialState.FAIL and trials[cut.number].user_attrs["retried"]
    assert prune_checkpoints(study, s, run_dir) == []
    assert (ckpt / "model.safetensors").is_file()


def test_two_workers_with_different_searches_racing_to_create_a_study_one_refuses(
    make_search, tmp_path, monkeypatch
):
    """Both open a new study on one journal at the same moment; the attribute writes are slowed so both
    would have read the study before either recorded its search."""
    import threading

    from moeforge.search import open_storage, open_study

    a = make_search(n_trials=2, name="a")
    b = make_search(n_trials=2, name="b", budget="2.0e+9")
    url = str(tmp_path / "run" / "study.journal")
    set_attr = optuna.Study.set_user_attr

    def slow_set(self, key, value):
        time.sleep(0.3)
        set_attr(self, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", slow_set)
    start = threading.Barrier(2)
    outcome: dict = {}

    def open_one(search):
        storage = open_storage(url)
        start.wait()
        try:
            open_study(search, url, "shared", storage=storage)
            outcome[search.name] = "joined"
        except SearchStop as e:
            outcome[search.name] = str(e)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcome) == ["a", "b"]
    joined = [n for n, o in outcome.items() if o == "joined"]
    refused = [o for o in outcome.values() if o != "joined"]
    assert len(joined) == 1 and len(refused) == 1, outcome
    assert "holds a different search" in refused[0]
    held = optuna.load_study(study_name="shared", storage=open_storage(url)).user_attrs["search"]
    assert held["name"] == joined[0]


def test_a_non_finite_bits_per_byte_fails_as_no_metric(make_search, tmp_path):
    """A validation loss that is not finite has no bits per byte (None): the trial fails for that, not
    for a TypeError from formatting None in the progress line."""
    s = make_search("  granularity: [2]", n_trials=1, extra="objective: {metric: val_bits_per_byte}")
    study = _study(s)
    logs: list[str] = []

    def evaluate(spec, seed, budget, out_dir, on_eval):
        on_eval(0.5, {"val_loss": float("nan"), "val_bits_per_byte": None})
        return fake_summary(final_val_loss=float("nan"), val_bits_per_byte=None, budget_flops=budget)

    run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=logs.append))
    t = study.get_trials()[0]
    assert t.state == TrialState.FAIL
    assert t.user_attrs["fail_kind"] == "NoMetric", t.user_attrs.get("fail_reason")
    assert any("50% of budget, val_bits_per_byte n/a" in line for line in logs), logs
