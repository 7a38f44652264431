"""Budget-constrained architecture search over model specs with Optuna.

Public API:
    load_search(path_or_name, overrides=()) -> SearchSpec
    search_schema() -> dict (JSON Schema of search specs)
    trial_to_spec(search, params) -> ModelSpec      the one way a trial becomes a spec (pure)
    constraint_values(search, spec) -> list[float]  Optuna's convention, <= 0 feasible
    run_search(search, RunConfig(run_dir, ...), evaluate=None) -> SearchResult (counts, best TrialRecord)
        evaluate: (spec, seed, budget_flops, out_dir, on_eval) -> the trainer's RunSummary; default real training
    report(run_dir, storage, study) -> (SearchSpec, list[TrialRecord])
    TrialRecord, load_trial_records(path)          one trial as trials.json holds it; reading trials.json
    ladder_compute(records) -> (trained, separate) | None   tokens a branched-cooldown ladder trained, and
                                                    what separate runs would have (`train.branch_cooldowns`)
    leaderboard(records), noise_marks(records)       trials best first; best / tied / beyond the seed noise
    seed_stats(values), tied(best, other), TIE_RULE  the one seed-noise rule every leaderboard uses

Scaling laws (`moeforge scaling`):
    load_runs(source, n_kind) -> Runs               a run dir, trials.json or CSV, one entry per seed
    n_words(n_kind) -> str                          what N counts, in words
    fit_law(runs, law_name=None, resamples=200) -> Fit   constants, 95% bootstrap intervals, RMSE, holdout
    load_fit(path), fit_from_data(data, path) -> Fit   a fit.json written by `moeforge scaling fit --out`
    predict_optimum(fit, budget, granularities) -> Prediction   compute-optimal N, D, G and the loss
    realize(search, base_params, size, granularity) -> ModelSpec   a trial's spec at another size and m
    write_scaling_plots(runs, fit, out_dir, target=None) -> plot names (IsoFLOP, loss vs G, residuals, ...)
    check_law(fit, budget, out_dir) -> Check        train the law's optimum and the largest budget's best at a
                                                    new budget; Check.held: each measured loss in its interval
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._seeds import TIE_RULE, seed_stats, tied
from ._space import Infeasible, constraint_values, describe, grid_space, spec_key, suggest, trial_to_spec
from ._spec import SearchSpec, load_search, search_schema, train_config

if TYPE_CHECKING:
    from ._branching import ladder_compute, ladder_compute_line
    from ._data import data_problem, load_search_corpus
    from ._driver import RunConfig, auto_workers, report, run_one_worker, run_search
    from ._errors import SearchStop, TrialFailed
    from ._evaluate import Evaluate, real_evaluator
    from ._records import RECORD_KEYS, TrialRecord, load_trial_records, trial_record, trial_records
    from ._results import leaderboard, noise_marks, write_results
    from ._samplers import make_sampler
    from ._scaling.check import Check, check_law
    from ._scaling.errors import FitFailed, ScalingInputError
    from ._scaling.fit import Fit, fit_from_data, fit_law, load_fit
    from ._scaling.laws import LAWS
    from ._scaling.plots import write_scaling_plots
    from ._scaling.predict import Prediction, predict_optimum, realize
    from ._scaling.runs import Runs, load_runs, n_words, runs_from_records
    from ._storage import open_storage
    from ._study import open_study
    from ._summary import SearchResult
    from ._training import rule_for
    from ._trials import counted
    from ._worker import WorkerOptions, run_worker

# Names that need Optuna resolve on first use (PEP 562), so loading and validating a search spec
# (`moeforge validate`) does not pay for importing it.
_LAZY = {
    **dict.fromkeys(("RunConfig", "auto_workers", "report", "run_one_worker", "run_search"), "_driver"),
    **dict.fromkeys(("leaderboard", "noise_marks", "write_results"), "_results"),
    **dict.fromkeys(
        ("RECORD_KEYS", "TrialRecord", "load_trial_records", "trial_record", "trial_records"), "_records"
    ),
    "SearchResult": "_summary",
    # numpy and scipy only: `moeforge scaling` on a CSV imports no Optuna
    **dict.fromkeys(("FitFailed", "ScalingInputError"), "_scaling.errors"),
    **dict.fromkeys(("Fit", "fit_from_data", "fit_law", "load_fit"), "_scaling.fit"),
    "LAWS": "_scaling.laws",
    **dict.fromkeys(("Prediction", "predict_optimum", "realize"), "_scaling.predict"),
    **dict.fromkeys(("Runs", "load_runs", "n_words", "runs_from_records"), "_scaling.runs"),
    "write_scaling_plots": "_scaling.plots",
    **dict.fromkeys(("Check", "check_law"), "_scaling.check"),
    # the search's engine, one concept per module (see each module's docstring)
    **dict.fromkeys(("data_problem", "load_search_corpus"), "_data"),
    **dict.fromkeys(("SearchStop", "TrialFailed"), "_errors"),
    **dict.fromkeys(("Evaluate", "real_evaluator"), "_evaluate"),
    **dict.fromkeys(("ladder_compute", "ladder_compute_line"), "_branching"),
    "make_sampler": "_samplers",
    "rule_for": "_training",
    "open_storage": "_storage",
    "open_study": "_study",
    "counted": "_trials",
    **dict.fromkeys(("WorkerOptions", "run_worker"), "_worker"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "LAWS",
    "Check",
    "Evaluate",
    "Fit",
    "FitFailed",
    "Prediction",
    "Runs",
    "TIE_RULE",
    "ScalingInputError",
    "Infeasible",
    "RECORD_KEYS",
    "RunConfig",
    "SearchResult",
    "SearchSpec",
    "TrialRecord",
    "SearchStop",
    "TrialFailed",
    "WorkerOptions",
    "constraint_values",
    "counted",
    "describe",
    "fit_from_data",
    "fit_law",
    "auto_workers",
    "check_law",
    "data_problem",
    "load_search_corpus",
    "grid_space",
    "ladder_compute",
    "ladder_compute_line",
    "leaderboard",
    "load_fit",
    "load_runs",
    "load_search",
    "load_trial_records",
    "make_sampler",
    "n_words",
    "noise_marks",
    "open_storage",
    "open_study",
    "predict_optimum",
    "realize",
    "real_evaluator",
    "report",
    "run_one_worker",
    "run_search",
    "run_worker",
    "runs_from_records",
    "search_schema",
    "seed_stats",
    "spec_key",
    "suggest",
    "tied",
    "trial_record",
    "trial_records",
    "trial_to_spec",
    "train_config",
    "rule_for",
    "write_results",
    "write_scaling_plots",
]
