"""Reading a study's trials: which are the last word on their spec, which count toward ``n_trials``,
which is best, and where a trial's files live in the run dir.

Which trials count toward ``n_trials`` (across all workers): those that trained or are training and
are final, i.e. carry the user attr ``counted``, did not die with their worker and were not superseded
by a retry. Infeasible proposals (told PRUNED with their ``constraints``, so constraint-aware samplers
learn from them) and proposals that repeat an earlier or running spec (told that spec's result,
``reused_from``) cost nothing and do not count.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)

MAX_ATTEMPTS = 3  # trainings of one spec (first try and retries, for failures and for dead workers)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def died(t: FrozenTrial) -> bool:
    """Failed because its worker went away (not because training raised)."""
    return t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") is None


def superseded(t: FrozenTrial) -> bool:
    """Not the last word on its spec: its worker died, a retry follows it, or it never trained."""
    ua = t.user_attrs
    return died(t) or bool(ua.get("retried") or ua.get("skipped"))


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count toward n_trials: they trained (or are training) and are the final attempt."""
    return [
        t
        for t in trials
        if t.user_attrs.get("counted") and t.state != TrialState.WAITING and not superseded(t)
    ]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The lowest-loss complete trial that trained itself (reused results point at their original); on a
    budget ladder, of the largest budget that has one (losses of different budgets do not compare)."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("reused_from") is None
    ]
    if not done:
        return None
    top = max(t.params.get("budget", 0.0) for t in done)
    return min((t for t in done if t.params.get("budget", 0.0) == top), key=lambda t: t.values[0])


def params_label(params: dict) -> str:
    """``m=2, size=0.5, budget=1.5e+11``: floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trial_dir(run_dir: Path, key: str) -> Path:
    """A spec's folder in the run dir: one sub-folder per seed, shared by every attempt at that spec.

    Keyed by the spec (and its budget on a ladder) and not by trial number, so a retried trial resumes
    from its own checkpoint (``trials/<spec_key>/seed-<seed>``)."""
    return run_dir / "trials" / key
