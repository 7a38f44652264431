"""A law checks itself at a budget it never saw (`moeforge scaling check`): train, with the study's own
training rules, the optimum `predict_optimum` gives for that budget and the best configuration of the
study's largest budget, and hold each measured loss against the interval the law predicted for it.

The study's own training rules are its search spec, stored in the fit (`Fit.search`): the train options,
the hyper-parameter rule at the budget (`rule_for`), the seeds and the data. Every (spec, budget, seed) is
one unit in `out/trials/<spec key>-C<budget>/seed-<seed>`, trained by the search's evaluator
(`real_evaluator`): a finished unit is read back, never trained again, and an interrupted one resumes
from its checkpoint.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ScalingInputError
from .fit import Fit, loss_ci95
from .predict import predict_optimum
from .runs import N_KINDS

if TYPE_CHECKING:
    from moeforge.compiler import ModelSpec

    from .._spec import SearchSpec

ROLES = {
    "optimum": "the law's optimum",
    "best_of_largest": "best of the largest budget",
}
"""What each checked configuration is, in words."""


@dataclass
class CheckedRun:
    """One configuration trained at the checked budget: what the law predicted for it and what it measured."""

    role: str
    """`optimum` (predicted by the law) or `best_of_largest` (the study's best at its largest budget)."""
    spec: ModelSpec
    spec_key: str
    params: float
    """N as the fit counts it (`Fit.n_kind`)."""
    tokens: float
    granularity: float | None
    predicted: float
    interval: list[float]
    """The 95% interval of the predicted loss over the bootstrap's fits."""
    folder: Path
    measured: list[float] = field(default_factory=list)
    """The objective's value at each of the study's seeds."""

    @property
    def what(self) -> str:
        """The role in words."""
        return ROLES[self.role]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.measured)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.measured) if len(self.measured) > 1 else None

    @property
    def held(self) -> bool:
        lo, hi = self.interval
        return lo <= self.mean <= hi

    def summary(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "spec_name": self.spec.name,
            "spec_key": self.spec_key,
            "params": self.params,
            "tokens": self.tokens,
            "granularity": self.granularity,
            "predicted": self.predicted,
            "interval": self.interval,
            "measured": self.mean if self.measured else None,
            "measured_std": self.std if self.measured else None,
            "seed_values": self.measured,
            "held": self.held if self.measured else None,
            "dir": str(self.folder),
        }


@dataclass
class Check:
    """The law at one budget against training: `held` when every measured loss is inside its interval."""

    budget_flops: float
    metric: str
    seeds: list[int]
    runs: list[CheckedRun]
    out: Path

    @property
    def held(self) -> bool:
        return all(r.held for r in self.runs)

    def summary(self) -> dict[str, Any]:
        return {
            "budget_flops": self.budget_flops,
            "metric": self.metric,
            "seeds": self.seeds,
            "held": self.held,
            "runs": [r.summary() for r in self.runs],
            "out": str(self.out),
        }


def plan_check(
    fit: Fit, budget: float, out: Path, granularities: Sequence[float] = (1, 2, 4, 8, 16)
) -> tuple[SearchSpec, list[CheckedRun]]:
    """The study's search spec and the configurations to train at `budget`, with the law's prediction for
    each (nothing is trained, no torch is imported).

    Raises:
        ScalingInputError: a fit without a search spec or best trial, or without bootstrap intervals.
    """
    from moeforge.compiler import account

    from .._space import Infeasible, spec_key, trial_to_spec

    search = fit.search_spec()
    if search is None or fit.best_params is None:
        raise ScalingInputError(
            f"a check trains with the study's own rules; this fit is of {fit.source}, which has no search spec "
            "(fit a search's run dir)"
        )
    if not fit.samples:
        raise ScalingInputError(
            "the fit has no bootstrap fits, so no interval to check against (fit with --resamples > 0)"
        )
    pred = predict_optimum(fit, budget, granularities, "accounting", search=search)
    assert pred.spec is not None  # accounting on a search's fit realizes a spec
    try:
        best = trial_to_spec(search, dict(fit.best_params))
    except Infeasible as e:
        raise ScalingInputError(f"the best trial of the largest budget no longer makes a spec: {e}") from None
    law = fit.law_obj
    runs = []
    for role, spec in (("optimum", pred.spec), ("best_of_largest", best)):
        acc = account(spec)
        n = float(getattr(acc, N_KINDS[fit.n_kind]))
        d = budget / float(acc.train_flops_per_token)
        g = float(spec.moe_derived.m) if law.uses_g and spec.moe_derived is not None else None
        if role == "optimum":
            predicted, interval = pred.loss, list(pred.loss_ci)
        else:
            predicted, interval = float(fit.predict_loss(n, d, g)), loss_ci95(fit, n, d, g)
        key = spec_key(spec)
        folder = out / "trials" / f"{key}-C{budget:.6g}"
        runs.append(CheckedRun(role, spec, key, n, d, g, predicted, interval, folder))
    return search, runs


def check_law(
    fit: Fit,
    budget: float,
    out: Path,
    granularities: Sequence[float] = (1, 2, 4, 8, 16),
    device: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Check:
    """Train the law's optimum at `budget` and the study's best configuration of its largest budget, at
    every seed of the study, into `out`; finished units are reused.

    Raises:
        ScalingInputError: bad input (see `plan_check`), a budget too small to train, data the specs cannot
            use, or an `out` that holds a check of another study's training rules.
        Exception: whatever a training raises (a diverged run, out of memory).
    """
    from .._data import data_problem, load_search_corpus
    from .._errors import SearchStop
    from .._evaluate import finished_summary, real_evaluator
    from .._space import budget_problem

    if not (math.isfinite(budget) and budget > 0):
        raise ScalingInputError(f"--budget {budget}: must be a positive number of FLOPs")
    search, runs = plan_check(fit, budget, out, granularities)
    _claim(out, search)
    try:
        corpus = load_search_corpus(search)
    except SearchStop as e:
        raise ScalingInputError(str(e)) from None
    for r in runs:
        why = budget_problem(search, r.spec, budget) or data_problem(search, r.spec, corpus)
        if why:
            raise ScalingInputError(f"--budget {budget:.3g}: {r.what} ({r.spec.name}): {why}")
    from moeforge.compiler import spec_to_yaml

    metric = search.objective.metric
    evaluate = real_evaluator(search, corpus, device)
    for r in runs:
        r.folder.mkdir(parents=True, exist_ok=True)
        (r.folder / "spec.yaml").write_text(
            spec_to_yaml(r.spec, header=f"{r.what} at {budget:.3g} training FLOPs (moeforge scaling check)")
        )
        for seed in search.seeds:
            unit = r.folder / f"seed-{seed}"
            done = finished_summary(unit, budget) is not None
            if not done:
                log(f"training {r.what} ({r.spec_key}) at {budget:.3g} FLOPs, seed {seed}")
            summary = evaluate(r.spec, seed, budget, unit, lambda f, m: None)
            value = summary.final_val_loss if metric == "val_loss" else summary.val_bits_per_byte
            if value is None or not math.isfinite(value):
                raise RuntimeError(f"{r.what} seed {seed}: no finite {metric} (see {unit})")
            r.measured.append(float(value))
            log(
                f"{r.what} seed {seed}: {metric} {value:.4f}"
                + (" (finished earlier, reused)" if done else "")
            )
    check = Check(budget, metric, list(search.seeds), runs, out)
    (out / "check.json").write_text(
        json.dumps(_strict({**check.summary(), "study": _rules(search)}), indent=2) + "\n"
    )
    return check


def _rules(search: SearchSpec) -> dict[str, Any]:
    """What makes two checks' trainings the same: the study's training rules, objective and seeds."""
    return {
        "train": search.train.model_dump(mode="json"),
        "objective": search.objective.model_dump(mode="json"),
        "seeds": list(search.seeds),
    }


def _claim(out: Path, search: SearchSpec) -> None:
    """Refuse an `out` whose runs were trained under other rules (a unit is keyed by spec and budget only)."""
    path = out / "check.json"
    if path.is_file():
        try:
            before = json.loads(path.read_text()).get("study")
        except (OSError, ValueError, AttributeError):
            before = None
        if before is not None and before != json.loads(json.dumps(_rules(search))):
            raise ScalingInputError(
                f"--out {out}: holds runs trained under another study's training rules; give a fresh --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"study": _rules(search)}, indent=2) + "\n")


def _strict(obj: Any) -> Any:
    """NaN and infinities as null, so check.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj
