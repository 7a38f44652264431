"""The worker loop of a search, and the protocol that lets workers share one study.

A worker loops: ask a trial, turn it into a spec (`trial_to_spec`), check it analytically and against
the data, and only then train it (`train_trial`). Across workers: one trainer per spec (a trial claims
its spec; a repeat reuses the result), the ``n_trials`` cap holds however workers interleave, a failed
spec is trained again once more (one that fails the same way twice, same exception type, or
``MAX_ATTEMPTS`` times in all, is not), and a ladder proposal is queued at every other budget. A worker
never leaves while a counted trial still runs elsewhere: that worker may be dead, and its retry needs
someone to train it.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._checkpoints import prune_checkpoints
from ._data import data_problem
from ._evaluate import Evaluate, train_trial
from ._heartbeat import Heartbeat, fail_and_retry, reap_dead
from ._samplers import constrain, constraint_names, violations
from ._space import (
    Infeasible,
    budget_problem,
    constraint_values,
    describe,
    grid_space,
    spec_key,
    suggest,
    trial_budget,
    trial_to_spec,
)
from ._spec import SearchSpec
from ._trials import FINISHED, MAX_ATTEMPTS, best_trial, counted, died, params_label, superseded

if TYPE_CHECKING:
    from moeforge.runtime import Corpus

MAX_SKIPS = 200  # consecutive proposals that train nothing before the space counts as exhausted
POLL_S = 1.0  # how often a waiting worker looks at the study again
SETTLE_S = 0.5  # after claiming a spec, how long to wait before checking that nobody else claimed it


@dataclass
class WorkerOptions:
    run_dir: Path
    worker: int = 0
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    corpus: Corpus | None = None
    """The data every trial trains on: proposals it cannot serve are infeasible; trials record it."""
    poll_s: float = POLL_S
    settle_s: float = SETTLE_S
    storage: optuna.storages.BaseStorage | None = None
    """The study's storage as `open_storage` built it: trials record heartbeats where it supports them;
    None (an in-memory study) finds dead workers by pid only."""
    _waiting_said: set = field(default_factory=set)


def _fresh_attrs(trial: optuna.Trial, opts: WorkerOptions) -> None:
    # A retry is queued with the attrs of the trial it retries (Optuna's stale-trial callback copies
    # them); the decisions of that attempt do not carry over.
    carried = trial.user_attrs
    for k in (
        "counted",
        "claim",
        "reused_from",
        "infeasible",
        "fail_reason",
        "fail_kind",
        "retried",
        "waiting_for",
    ):
        if k in carried:
            trial.set_user_attr(k, False if k in ("counted", "claim") else None)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("worker", opts.worker)


def run_worker(search: SearchSpec, study: optuna.Study, evaluate: Evaluate, opts: WorkerOptions) -> int:
    """Propose, check and train trials until the cap, the timeout, or an exhausted space; returns trials trained."""
    cap = search.n_trials
    deadline = time.monotonic() + search.timeout_s if search.timeout_s else math.inf
    prefix = f"[w{opts.worker}]"
    skips = trained = 0
    sampler = study.sampler
    while True:
        if time.monotonic() > deadline:
            opts.log(f"{prefix} timeout reached")
            break
        for n in reap_dead(study, opts.storage):
            opts.log(f"{prefix} trial {n}: its worker died; failed and queued again")
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        full = len(counted(trials)) >= cap
        exhausted = not waiting and (
            skips >= MAX_SKIPS
            or (isinstance(sampler, optuna.samplers.GridSampler) and not _grid_left(search, trials))
        )
        if full or exhausted:
            # Stay while a trial runs elsewhere: its worker may be dead, and then its retry needs us.
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
            if not running:
                if exhausted and not full:
                    opts.log(f"{prefix} the space is exhausted: no new feasible spec in the last proposals")
                break
            _say_once(opts, f"{prefix} waiting for running trials {running} before leaving")
            time.sleep(opts.poll_s)
            continue
        trial = study.ask()
        with Heartbeat(
            opts.storage, study, trial
        ):  # from the start, so a worker killed at any point is found stale
            try:
                outcome = _run_trial(search, study, trial, evaluate, opts)
            except KeyboardInterrupt:
                trial.set_user_attr("died", "interrupted")
                fail_and_retry(study, trial, opts.storage)
                opts.log(f"{prefix} trial {trial.number}: interrupted; it runs again when the search resumes")
                raise
        if outcome == "trained":
            trained += 1
            skips = 0
            _log_best(study, prefix, opts.log)
            prune_checkpoints(study, search, opts.run_dir)
        elif outcome == "full":
            continue
        else:
            skips += 1
    return trained


def _grid_left(search: SearchSpec, trials: list[FrozenTrial]) -> bool:
    """Whether some grid point has not been started. Optuna's own `is_exhausted` counts running points
    as not done and proposes them again; here a running point is someone's, and a dead worker's point
    comes back as a queued retry."""
    grid = grid_space(search)
    names = list(grid)
    started = {
        tuple(t.params.get(n) for n in names)
        for t in trials
        if t.state != TrialState.WAITING and all(n in t.params for n in names)
    }
    return any(point not in started for point in itertools.product(*grid.values()))


def _say_once(opts: WorkerOptions, line: str) -> None:
    if line not in opts._waiting_said:
        opts._waiting_said.add(line)
        opts.log(line)


def _run_trial(
    search: SearchSpec, study: optuna.Study, trial: optuna.Trial, evaluate: Evaluate, opts: WorkerOptions
) -> str:
    """One asked trial to its end; returns "trained", "skipped" (told without training) or "full"."""
    prefix = f"[w{opts.worker}]"
    _fresh_attrs(trial, opts)
    params = suggest(trial, search)
    label = params_label(params)
    n_cons = len(constraint_names(search))

    def infeasible(why: str, cons: list[float]) -> str:
        constrain(trial, search, cons)
        trial.set_user_attr("infeasible", why)
        study.tell(trial, state=TrialState.PRUNED)
        opts.log(f"{prefix} trial {trial.number} ({label}): infeasible, {why}")
        return "skipped"

    # ---- analytic and data checks: nothing is built before these pass
    try:
        spec = trial_to_spec(search, params)
    except Infeasible as e:
        return infeasible(str(e), [1.0] + [0.0] * (n_cons - 1))
    for k, v in describe(spec).items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("spec", spec.model_dump(mode="json"))
    budget = trial_budget(search, params)
    trial.set_user_attr("budget_flops", budget)
    # The unit of work is a spec at a budget: on a ladder each budget has its own key (claims, folders).
    key = spec_key(spec) + (f"-C{budget:.6g}" if search.budget.ladder else "")
    trial.set_user_attr("spec_key", key)
    limits = constraint_values(search, spec)
    data_why = data_problem(search, spec, opts.corpus) if opts.corpus is not None else None
    cons = [0.0, 1.0 if data_why else 0.0, *limits]
    if data_why:
        return infeasible(f"does not fit the data: {data_why}", cons)
    if any(c > 0 for c in limits):
        return infeasible(violations(search, limits), cons)
    too_small = budget_problem(search, spec, budget)
    if too_small:  # trains too few steps to be a run: a proposal that cannot run, as an invalid spec
        return infeasible(too_small, [1.0, *cons[1:]])
    constrain(trial, search, cons)
    if opts.corpus is not None:
        trial.set_user_attr("data_fingerprint", opts.corpus.fingerprint)

    queued = {"sibling_of", "retry_of"} & set(trial.user_attrs)
    if search.budget.ladder and search.sampler.kind != "grid" and not queued:  # drawn by the sampler
        _enqueue_other_budgets(study, trial, params, search)

    # ---- one trainer per spec, across workers
    earlier = _claim(study, trial, key, opts)
    if earlier is not None:
        _reuse(study, trial, earlier)
        opts.log(
            f"{prefix} trial {trial.number} ({label}): same spec as trial {earlier.number}, result reused"
        )
        return "skipped"
    trial.set_user_attr("counted", True)
    if not _under_cap(study, trial, search.n_trials, opts):  # other workers filled the cap since we looked
        trial.set_user_attr("skipped", "n_trials reached by other workers")
        study.tell(trial, state=TrialState.FAIL)
        return "full"

    # ---- train, once per seed
    state, values = train_trial(search, spec, trial, evaluate, opts.run_dir, opts.log, prefix, label)
    if state == TrialState.FAIL:
        _maybe_retry(study, trial, key, opts)
    study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
    return "trained"


def _enqueue_other_budgets(
    study: optuna.Study, trial: optuna.Trial, params: dict, search: SearchSpec
) -> None:
    """A proposal of a ladder search that the sampler drew (not a queued one) is queued at every other
    budget, so each architecture trains at every budget."""
    for c in search.budget.budgets:
        if c != params["budget"]:
            study.enqueue_trial({**params, "budget": c}, user_attrs={"sibling_of": trial.number})


def _under_cap(study: optuna.Study, trial: optuna.Trial, cap: int, opts: WorkerOptions) -> bool:
    """Whether this trial, just marked counted, may train without the study passing `cap`.

    Only earlier trials (lower numbers) are weighed: those counted, and those still running that may yet
    count (not yet decided, and not waiting on another trial's result). Of trials deciding at once the
    later ones wait for the earlier ones, so the cap holds however the workers interleave.
    """
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        done = len(counted(earlier))
        undecided = [
            t
            for t in earlier
            if t.state == TrialState.RUNNING
            and not t.user_attrs.get("counted")
            and t.user_attrs.get("waiting_for") is None
        ]
        if done >= cap:
            return False
        if done + len(undecided) < cap:
            return True
        time.sleep(opts.poll_s / 5)
        reap_dead(study, opts.storage)


def _same_key(study: optuna.Study, key: str, number: int) -> list[FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number != number
        and t.user_attrs.get("spec_key") == key
        and not t.user_attrs.get("infeasible")
        and t.user_attrs.get("reused_from") is None
    ]


def _claim(study: optuna.Study, trial: optuna.Trial, key: str, opts: WorkerOptions) -> FrozenTrial | None:
    """Decide who trains spec `key`: returns the finished trial whose result this one reuses (after
    waiting for a trial that trains it right now), or None when this trial trains it.

    A trial claims a spec (user attr ``claim``) after seeing no other claim, then looks again after
    `settle_s`; of two that claimed at once, the higher number yields. A claimant whose worker died is
    failed by `reap_dead` and stops counting, so the spec is claimed again.
    """
    prefix = f"[w{opts.worker}]"
    while True:
        others = _same_key(study, key, trial.number)
        done = [t for t in others if t.state in FINISHED and not superseded(t)]
        if done:
            return min(done, key=lambda t: t.number)
        claims = [t for t in others if t.state == TrialState.RUNNING and t.user_attrs.get("claim")]
        if not claims:
            trial.set_user_attr("waiting_for", None)
            trial.set_user_attr("claim", True)
            if not any(
                t.state == TrialState.RUNNING
                for t in study.get_trials(deepcopy=False)
                if t.number != trial.number
            ):
                return None  # nobody else is running anything: no race to settle
            time.sleep(opts.settle_s)
            rivals = [
                t
                for t in _same_key(study, key, trial.number)
                if t.state == TrialState.RUNNING and t.user_attrs.get("claim") and t.number < trial.number
            ]
            if not rivals:
                return None
            trial.set_user_attr("claim", False)
            claims = rivals
        trial.set_user_attr("waiting_for", claims[0].number)  # not a candidate for the cap meanwhile
        _say_once(
            opts,
            f"{prefix} trial {trial.number}: same spec as running trial {claims[0].number}; waiting for it",
        )
        time.sleep(opts.poll_s)
        for n in reap_dead(study, opts.storage):
            opts.log(f"{prefix} trial {n}: its worker died; failed and queued again")


def _reuse(study: optuna.Study, trial: optuna.Trial, earlier: FrozenTrial) -> None:
    trial.set_user_attr("reused_from", earlier.number)
    for k in (
        "fail_reason",
        "fail_kind",
        "train_flops",
        "budget_flops",
        "tokens",
        "value_mean",
        "value_std",
        "seeds",
        "seed_values",
        "hparams",
    ):
        if k in earlier.user_attrs:
            trial.set_user_attr(k, earlier.user_attrs[k])
    if earlier.state == TrialState.COMPLETE:
        study.tell(trial, earlier.values)
    else:
        study.tell(trial, state=earlier.state)


def _maybe_retry(study: optuna.Study, trial: optuna.Trial, key: str, opts: WorkerOptions) -> None:
    """Queue a failed trial again unless its spec failed the same way before or ran out of attempts."""
    kind = trial.user_attrs.get("fail_kind")
    before = [t for t in _same_key(study, key, trial.number) if t.state == TrialState.FAIL and not died(t)]
    prefix = f"[w{opts.worker}]"
    if any(t.user_attrs.get("fail_kind") == kind for t in before):
        opts.log(f"{prefix} trial {trial.number}: failed the same way twice ({kind}); not retried")
        return
    if len(before) + 1 >= MAX_ATTEMPTS:
        opts.log(f"{prefix} trial {trial.number}: {MAX_ATTEMPTS} failed attempts; not retried")
        return
    trial.set_user_attr("retried", True)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    opts.log(f"{prefix} trial {trial.number}: queued again (a second failure of the same kind is final)")


def _log_best(study: optuna.Study, prefix: str, log: Callable[[str], None]) -> None:
    b = best_trial(study)
    if b is not None:
        log(f"{prefix} best so far: trial {b.number}, value {b.values[0]:.4f} ({params_label(b.params)})")
