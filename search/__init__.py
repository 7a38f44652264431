"""Budget-constrained architecture search over model specs with Optuna.

Public API:
    load_search(path_or_name, overrides=()) -> SearchSpec
    search_schema() -> dict (JSON Schema of search specs)
    trial_to_spec(search, params) -> ModelSpec      the one way a trial becomes a spec (pure)
    constraint_values(search, spec) -> list[float]  Optuna's convention, <= 0 feasible
    run_search(search, RunConfig(run_dir, ...), evaluate=None) -> summary dict
        evaluate: (spec, seed, budget_flops, out_dir, on_eval) -> the trainer's summary; default real training
    report(run_dir, storage, study) -> (SearchSpec, trial records)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._space import Infeasible, constraint_values, describe, grid_space, spec_key, suggest, trial_to_spec
from ._spec import SearchSpec, load_search, search_schema

if TYPE_CHECKING:
    from ._driver import RunConfig, auto_workers, report, run_one_worker, run_search
    from ._results import leaderboard, trial_record, trial_records, write_results
    from ._run import (
        Evaluate,
        SearchStop,
        TrialFailed,
        WorkerOptions,
        counted,
        data_problem,
        load_search_corpus,
        make_sampler,
        open_storage,
        open_study,
        real_evaluator,
        run_worker,
    )

# Names that need Optuna resolve on first use (PEP 562), so loading and validating a search spec
# (`moeforge validate`) does not pay for importing it.
_LAZY = {
    **dict.fromkeys(("RunConfig", "auto_workers", "report", "run_one_worker", "run_search"), "_driver"),
    **dict.fromkeys(("leaderboard", "trial_record", "trial_records", "write_results"), "_results"),
    **dict.fromkeys(
        (
            "Evaluate",
            "SearchStop",
            "TrialFailed",
            "WorkerOptions",
            "counted",
            "data_problem",
            "load_search_corpus",
            "make_sampler",
            "open_storage",
            "open_study",
            "real_evaluator",
            "run_worker",
        ),
        "_run",
    ),
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
    "Evaluate",
    "Infeasible",
    "RunConfig",
    "SearchSpec",
    "SearchStop",
    "TrialFailed",
    "WorkerOptions",
    "constraint_values",
    "counted",
    "describe",
    "auto_workers",
    "data_problem",
    "load_search_corpus",
    "grid_space",
    "leaderboard",
    "load_search",
    "make_sampler",
    "open_storage",
    "open_study",
    "real_evaluator",
    "report",
    "run_one_worker",
    "run_search",
    "run_worker",
    "search_schema",
    "spec_key",
    "suggest",
    "trial_record",
    "trial_records",
    "trial_to_spec",
    "write_results",
]
