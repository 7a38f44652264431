"""What proposes trials and what stops them early: the sampler and pruner factories, and the trial
constraints (Optuna's convention, <= 0 feasible) that constraint-aware samplers learn from."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._space import grid_space
from ._spec import SearchSpec


def constraint_names(search: SearchSpec) -> list[str]:
    """Names of the trial constraints: ``valid_spec`` and ``fits_data`` first, then each limit set."""
    c = search.constraints
    limits = ("max_params_total", "max_params_activated", "max_forward_flops_per_token", "max_memory_bytes")
    return ["valid_spec", "fits_data", *(n for n in limits if getattr(c, n) is not None)]


def constrain(trial: optuna.Trial, search: SearchSpec, values: list[float]) -> None:
    """Record constraint values through Optuna's constraint API (samplers read them) and as a user attr."""
    trial.set_user_attr("constraints", values)
    for name, value in zip(constraint_names(search), values, strict=True):
        trial.set_constraint(name, float(value))


def violations(search: SearchSpec, limits: list[float]) -> str:
    """The limits a spec exceeds, by how much: ``max_params_total exceeded by 12.0%``."""
    names = constraint_names(search)[2:]
    return ", ".join(f"{n} exceeded by {v:.1%}" for n, v in zip(names, limits, strict=True) if v > 0)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler calls study.stop() when the grid is used up, which only works inside
    study.optimize; the worker loop asks is_exhausted() itself."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass


def make_sampler(
    search: SearchSpec, worker: int = 0, concurrent: bool = False
) -> optuna.samplers.BaseSampler:
    """The search's sampler; worker i uses seed + i (grid: seed; a shared storage salts i per process).

    With concurrent workers TPE uses the constant liar, so running trials count as bad results and
    workers do not propose the same region at once."""
    s = search.sampler
    seed = s.seed + worker
    if s.kind == "grid":
        # Not seed + worker: the grid sampler shuffles its grid with the seed and trial k of the study
        # takes grid point k, so workers with different seeds would cover some points twice and miss others.
        return _GridSampler(grid_space(search), seed=s.seed)
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.kind == "nsga2":
        pop = min(50, max(4, search.n_trials // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=s.n_startup_trials, constant_liar=concurrent
    )


def make_pruner(search: SearchSpec) -> optuna.pruners.BasePruner:
    p = search.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search.train.eval_points)
    return optuna.pruners.NopPruner()
