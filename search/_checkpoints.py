"""Which trial checkpoints a run keeps (`train.keep_checkpoints`) once trials finish."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ._branching import STABLE, stable_runs_needed
from ._spec import SearchSpec
from ._trials import FINISHED, best_trial, trial_dir


def prune_checkpoints(study: optuna.Study, search: SearchSpec, run_dir: Path) -> list[Path]:
    """Delete the checkpoints of finished trials that `train.keep_checkpoints` does not keep; returns them.

    A spec whose folder a running, queued or retried trial still needs is left alone, as is everything
    outside this run dir's own trial folders (summaries and metrics always stay). The stable run of a
    branched ladder keeps its branch checkpoints until every budget of its architecture has finished.
    """
    policy = search.train.keep_checkpoints
    if policy == "all":
        return []
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    keep = {best.user_attrs.get("spec_key")} if best is not None and policy == "best" else set()
    keep |= {
        t.user_attrs.get("spec_key")
        for t in trials
        if t.state in (TrialState.RUNNING, TrialState.WAITING) or t.user_attrs.get("retried")
    }
    finished: set[str] = {
        t.user_attrs["spec_key"] for t in trials if t.state in FINISHED and "spec_key" in t.user_attrs
    }
    finished -= keep
    removed = []
    for key in sorted(finished):
        for ckpt in sorted(trial_dir(run_dir, key).glob("seed-*/checkpoint*")):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    # stable runs of branched cooldowns (`_branching.py`): kept while any budget of theirs may still branch
    needed = stable_runs_needed(trials, search.budget.budgets)
    for run in sorted((run_dir / "trials").glob(f"*{STABLE}*")):
        if run.name.split(STABLE)[0] in needed:
            continue
        for ckpt in sorted([*run.glob("seed-*/checkpoint"), *run.glob("seed-*/branches")]):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    return removed
