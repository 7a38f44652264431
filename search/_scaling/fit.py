"""Fitting a law to runs: the Huber fit by L-BFGS-B, the bootstrap, the holdout, and `Fit` (fit.json).

The fit follows Hoffmann et al. 2022 (appendix D.2) as Epoch's replication does it (Besiroglu et al.
2024, arXiv 2404.10102): minimise the Huber loss (delta 1e-3) of log L_pred - log L over the runs, with
log L_pred a logsumexp of log terms (E = exp(e), A = exp(a), ...), by L-BFGS-B (scipy) from the best
points of a grid of starts; the best optimum is kept. Confidence intervals come from a bootstrap that
resamples configurations (a spec at a budget) with all their seeds, so seed noise is not counted as
independent evidence. Nothing here knows a law by name: each comes from `LAWS` with its function,
constants, bounds and grid.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from .decisions import decision_accuracy
from .errors import FitFailed, ScalingInputError
from .laws import LAWS, Law, default_law
from .runs import Runs, best_params

if TYPE_CHECKING:
    from .._spec import SearchSpec

Array = np.ndarray

HUBER_DELTA = 1e-3
LBFGSB_OPTIONS: dict[str, Any] = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10}
"""Tight tolerances: with scipy's defaults a bootstrap fit started at the full fit's optimum stops at once
on the nearly flat (L1-like) Huber loss, and the intervals come out far too narrow."""
TOP_STARTS = 16
BOOTSTRAP_STARTS = 3
"""L-BFGS-B runs from this many grid points, those with the lowest objective (the grid is evaluated in
one vectorized pass; running the optimizer from all of Hoffmann et al.'s 4500 starts adds nothing here)."""


@dataclass
class _Data:
    log_n: Array
    log_d: Array
    log_g: Array | None
    log_l: Array


def _data(runs: Runs, law: Law) -> _Data:
    return _Data(np.log(runs.n), np.log(runs.d), np.log(runs.g) if law.uses_g else None, np.log(runs.loss))


def _huber(r: Array) -> Array:
    a = np.abs(r)
    return np.where(a <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))


def _objective(law: Law, data: _Data, w: Array) -> Callable[[Array], tuple[float, Array]]:
    """Weighted Huber loss of the log residuals, and its gradient from the law's Jacobian."""
    scale = 1.0 / (HUBER_DELTA * max(float(w.sum()), 1.0))  # O(1) values for L-BFGS-B's tolerances

    def f(theta: Array) -> tuple[float, Array]:
        pred, jac = law.fn(theta, data.log_n, data.log_d, data.log_g, jac=True)
        r = pred - data.log_l
        psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
        return float(np.dot(w, _huber(r))) * scale, (jac @ (w * psi)) * scale

    return f


def _minimize(
    law: Law, data: _Data, w: Array, starts: Array, options: dict[str, Any] | None = None
) -> list[tuple[Array, float]]:
    """The L-BFGS-B optimum from each start that converged to a finite objective, best first."""
    f = _objective(law, data, w)
    found: list[tuple[Array, float]] = []
    bounds = law.bounds()
    for x0 in starts:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = minimize(
                f, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=options or LBFGSB_OPTIONS
            )
        # Status 2 is a line search that found no decrease: at a kink of the (nearly L1) Huber loss, a
        # minimum. Status 1 (out of iterations) and non-finite values are not converged.
        if res.status in (0, 2) and math.isfinite(res.fun):
            found.append((res.x, float(res.fun)))
    return sorted(found, key=lambda o: o[1])


def _distinct(optima: list[tuple[Array, float]], k: int) -> Array:
    """Up to k optima (best first) that differ from each other (by more than 0.01 in some entry)."""
    out: list[Array] = []
    for x, _ in optima:
        if all(np.max(np.abs(x - y)) > 1e-2 for y in out):
            out.append(x)
        if len(out) == k:
            break
    return np.array(out)


def _one_blas_thread() -> Any:
    """L-BFGS-B's BLAS calls are on 7-element vectors: OpenBLAS threads only contend for the cores (13x
    slower on a busy 2-core machine), so the fits run with one."""
    return threadpool_limits(limits=1, user_api="blas")


def _grid_starts(law: Law, data: _Data, w: Array, top: int = TOP_STARTS) -> Array:
    grid = np.array(list(itertools.product(*law.grid)), dtype=float)
    values = np.empty(len(grid))
    for i in range(0, len(grid), 2048):
        with np.errstate(all="ignore"):
            pred = law.fn(grid[i : i + 2048], data.log_n, data.log_d, data.log_g)
        values[i : i + 2048] = _huber(pred - data.log_l) @ w
    values[~np.isfinite(values)] = np.inf
    return grid[np.argsort(values, kind="stable")[:top]]


def fit_theta(law: Law, runs: Runs, w: Array | None = None, starts: Array | None = None) -> Array:
    """The law's theta fitted to `runs` (weights `w`, default 1 each) from `starts` (default the best
    points of the law's grid).

    Raises:
        FitFailed: no start converged.
    """
    return _optima(law, runs, w, starts)[0][0]


def _optima(
    law: Law, runs: Runs, w: Array | None = None, starts: Array | None = None
) -> list[tuple[Array, float]]:
    data = _data(runs, law)
    w = np.ones(len(runs)) if w is None else w
    starts = _grid_starts(law, data, w) if starts is None else starts
    with _one_blas_thread():
        # Every start runs to scipy's default tolerances; the few best distinct optima are then polished
        # with the tight ones (a third fewer iterations than polishing all, the same optimum).
        rough = _minimize(law, data, w, starts, {**LBFGSB_OPTIONS, "ftol": 2.2e-9, "gtol": 1e-5})
        found = _minimize(law, data, w, _distinct(rough, BOOTSTRAP_STARTS)) if rough else []
    if not found:
        raise FitFailed(
            f"the {law.name} fit did not converge from any of {len(starts)} starting points "
            f"({len(runs)} runs); more budgets or sizes may pin it down"
        )
    return found


@dataclass
class Fit:
    """A fitted law with its bootstrap, what `fit --out` saves as fit.json and `predict` reads."""

    law: str
    constants: dict[str, float]
    ci: dict[str, list[float]]
    samples: list[dict[str, float]]
    """The bootstrap's constants, one dict per converged resample."""
    rmse: float
    holdout: dict[str, Any] | None
    n_points: int
    n_kind: str
    source: str
    budgets: list[float]
    granularities: list[float]
    bootstrap: dict[str, Any]
    dropped: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None
    """The search spec the runs came from (model_dump), so predict can realize specs."""
    best_params: dict[str, Any] | None = None
    """The best trial's params at the largest budget (the base `predict` scales)."""
    holdout_note: str | None = None
    n_range: list[float] = field(default_factory=list)
    """The smallest and largest N of the runs (predictions outside it extrapolate in N)."""
    warnings: list[str] = field(default_factory=list)
    """Constants the runs do not determine (at a bound of the search, or an interval of zero width)."""
    decisions: dict[str, Any] | None = None
    """At the held-out budget: the share of configuration pairs the holdout's law orders as measured, and
    the share the next smaller budget's ranking does (`decisions.decision_accuracy`)."""

    @property
    def law_obj(self) -> Law:
        return LAWS[self.law]

    def predict_loss(self, n: Any, d: Any, g: Any = None, constants: dict[str, float] | None = None) -> Array:
        law = self.law_obj
        theta = law.to_theta(constants or self.constants)
        n_, d_ = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(d, dtype=float))
        log_g = np.log(np.broadcast_to(np.asarray(g, dtype=float), n_.shape)) if law.uses_g else None
        out = law.fn(theta, np.log(n_), np.log(d_), log_g)
        return np.exp(out).reshape(n_.shape)

    def summary(self) -> dict[str, Any]:
        """The `--json` of `moeforge scaling fit` (samples left out)."""
        law = self.law_obj
        out: dict[str, Any] = {
            "law": self.law,
            "formula": law.formula,
            "n_points": self.n_points,
            "constants": self.constants,
            "ci": self.ci,
            "rmse": self.rmse,
            "holdout": self.holdout,
            "n": self.n_kind,
            "source": self.source,
            "budgets": self.budgets,
            "granularities": self.granularities,
            "bootstrap": self.bootstrap,
            "dropped": self.dropped,
        }
        if law.published:
            out["published"] = {"values": law.published, "reference": law.reference}
        if self.holdout_note:
            out["holdout_note"] = self.holdout_note
        out["warnings"] = self.warnings
        out["n_range"] = self.n_range
        out["decisions"] = self.decisions
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "samples": self.samples,
            "search": self.search,
            "best_params": self.best_params,
            "format": "moeforge-scaling-fit/1",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fit:
        if data.get("format") != "moeforge-scaling-fit/1" or data.get("law") not in LAWS:
            raise ScalingInputError("not a fit.json written by `moeforge scaling fit --out`")
        return cls(
            law=data["law"],
            constants=data["constants"],
            ci=data["ci"],
            samples=data["samples"],
            rmse=data["rmse"],
            holdout=data["holdout"],
            n_points=data["n_points"],
            n_kind=data["n"],
            source=data["source"],
            budgets=data["budgets"],
            granularities=data["granularities"],
            bootstrap=data["bootstrap"],
            dropped=data.get("dropped", []),
            search=data.get("search"),
            best_params=data.get("best_params"),
            holdout_note=data.get("holdout_note"),
            warnings=data.get("warnings", []),
            n_range=data.get("n_range", []),
            decisions=data.get("decisions"),
        )

    def search_spec(self) -> SearchSpec | None:
        if self.search is None:
            return None
        from .._spec import SearchSpec

        return SearchSpec.model_validate(self.search)


def check_fittable(runs: Runs, law: Law) -> None:
    """Raises ScalingInputError when `runs` cannot determine `law`'s constants."""
    p = len(law.constants)
    if len(runs) == 0:
        raise ScalingInputError(f"{runs.source}: no complete runs to fit")
    if law.uses_g and not runs.has_g:
        missing = int(np.sum(~np.isfinite(runs.g)))
        raise ScalingInputError(
            f"law {law.name} needs the granularity G (m, or a CSV column granularity) of every run; "
            f"{missing} of {len(runs)} runs have none (use --law chinchilla)"
        )
    if len(runs) < p or runs.points() < p:
        raise ScalingInputError(
            f"law {law.name} has {p} constants but the data have {len(runs)} runs at {runs.points()} distinct "
            f"(N, D{', G' if law.uses_g else ''}) points; give at least {p}"
        )


def fit_law(
    runs: Runs, law_name: str | None = None, resamples: int = 200, seed: int = 0, holdout: bool = True
) -> Fit:
    """Fit a law to runs: constants, 95% bootstrap intervals, RMSE on the loss, and the
    leave-the-largest-budget-out holdout.

    Args:
        runs: from `load_runs`.
        law_name: a key of `LAWS`; default `default_law(runs)`.
        resamples: bootstrap resamples of the configurations (each with all its seeds); each resample's
            fit starts from the full fit's optimum.
        seed: the bootstrap's random seed (the same seed gives the same intervals).
        holdout: also fit without the largest budget's runs and report the mean absolute relative error
            of their predicted loss (None with one budget).

    Raises:
        ScalingInputError: too few runs for the law, or a law that needs G on data without it.
        FitFailed: no start converged.
    """
    name = law_name or default_law(runs)
    if name not in LAWS:
        raise ScalingInputError(f"--law {name}: choose one of {', '.join(LAWS)}")
    law = LAWS[name]
    check_fittable(runs, law)
    with _one_blas_thread():
        return _fit(runs, law, resamples, seed, holdout)


def _fit(runs: Runs, law: Law, resamples: int, seed: int, holdout: bool) -> Fit:
    name = law.name
    optima = _optima(law, runs)
    theta = optima[0][0]
    constants = law.to_constants(theta)
    data = _data(runs, law)
    pred = np.exp(law.fn(theta, data.log_n, data.log_d, data.log_g))
    rmse = float(np.sqrt(np.mean((pred - runs.loss) ** 2)))

    # Bootstrap: draw configurations with replacement; a configuration drawn k times weighs k on each seed.
    # Each resample starts from the full fit's optimum and from up to two other optima the grid found: from
    # the optimum alone, a resample cannot leave a flat direction (a constant the runs do not pin down).
    rng = np.random.default_rng(seed)
    n_groups = int(runs.group.max()) + 1
    boot_starts = _distinct(optima, BOOTSTRAP_STARTS)
    samples: list[dict[str, float]] = []
    for _ in range(resamples):
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        found = _minimize(law, data, counts[runs.group].astype(float), boot_starts)
        if found:
            samples.append(law.to_constants(found[0][0]))
    ci = {c: _ci95([s[c] for s in samples]) for c in law.constants}

    held: dict[str, Any] | None = None
    decisions: dict[str, Any] | None = None
    note = None
    budgets = runs.budgets()
    if holdout and len(budgets) >= 2:
        top = budgets[-1]
        train = runs.subset(runs.budget < top)
        test = runs.subset(runs.budget == top)
        try:
            check_fittable(train, law)
            th = fit_theta(law, train)
            tdata = _data(test, law)
            tp = np.exp(law.fn(th, tdata.log_n, tdata.log_d, tdata.log_g))
            # per configuration too: its seeds' mean loss against the law (the same N, D, G for every seed)
            groups = [np.flatnonzero(test.group == gi) for gi in sorted({int(x) for x in test.group})]
            config_err = [abs(tp[i[0]] - test.loss[i].mean()) / test.loss[i].mean() for i in groups]
            held = {
                "budget": top,
                "mean_abs_rel_error": float(np.mean(np.abs(tp - test.loss) / test.loss)),
                "n_points": len(test),
                "mean_abs_rel_error_configs": float(np.mean(config_err)),
                "n_configs": len(groups),
            }
            decisions = decision_accuracy(
                runs,
                lambda n, d, g: np.exp(law.fn(th, np.log(n), np.log(d), np.log(g) if law.uses_g else None)),
            )
        except (ScalingInputError, FitFailed) as e:
            note = f"no holdout: without the largest budget, {e}"
    elif holdout:
        note = "no holdout: one budget"

    return Fit(
        warnings=_undetermined(law, theta, ci, len(samples)),
        n_range=[float(runs.n.min()), float(runs.n.max())],
        law=name,
        constants=constants,
        ci=ci,
        samples=samples,
        rmse=rmse,
        holdout=held,
        n_points=len(runs),
        n_kind=runs.n_kind,
        source=runs.source,
        budgets=budgets,
        granularities=runs.distinct_g(),
        bootstrap={"resamples": resamples, "converged": len(samples), "seed": seed, "confidence": 0.95},
        dropped=list(runs.dropped),
        search=runs.search.model_dump(mode="json") if runs.search is not None else None,
        best_params=best_params(runs),
        holdout_note=note,
        decisions=decisions,
    )


def _undetermined(law: Law, theta: Array, ci: dict[str, list[float]], n_samples: int) -> list[str]:
    """Constants the runs leave undetermined: at a bound of the optimizer's box, or (with 10 or more
    bootstrap fits) an interval that reaches a bound, has zero width (no resample moved it), or for a scale
    spans more than a factor 1000. Checked in the fitted space (logs of the scales)."""
    out = []
    k = law.n_scales
    for i, (name, t, (lo, hi)) in enumerate(zip(law.constants, theta, law.bounds(), strict=True)):
        a, b = ci[name]
        if i < k and a > 0 and b > 0:
            a, b = math.log(a), math.log(b)
        if min(t - lo, hi - t) < 1e-6:
            value = law.to_constants(theta)[name]
            out.append(f"{name} is at the bound of its search ({value:.3g}): the runs do not determine it")
        elif n_samples < 10 or not (math.isfinite(a) and math.isfinite(b)):
            continue
        elif min(a - lo, hi - b) < 1e-3:
            out.append(f"{name}: its interval reaches the bound of the search: the runs do not determine it")
        elif b - a < 1e-6:
            out.append(
                f"{name}: no bootstrap fit moved it, so its interval says nothing: the runs do not determine it"
            )
        elif i < k and b - a > math.log(1e3):
            span = (b - a) / math.log(10)
            out.append(
                f"{name}: its interval spans {span:.0f} orders of magnitude: the runs do not determine it"
            )
    return out


def loss_ci95(f: Fit, n: float, d: float, g: float | None) -> list[float]:
    """The 95% interval of the loss the bootstrap's fits predict at (n, d, g); [nan, nan] without them."""
    if not f.samples:
        return [math.nan, math.nan]
    vals = np.array([float(f.predict_loss(n, d, g, s)) for s in f.samples])
    return _ci95(vals[np.isfinite(vals)])


def _ci95(vals: Sequence[float] | Array) -> list[float]:
    """The central 95% interval (2.5th and 97.5th percentiles) of `vals`; [nan, nan] when empty."""
    if not len(vals):
        return [math.nan, math.nan]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def load_fit(path: str | Path) -> Fit:
    """A fit.json written by `moeforge scaling fit --out`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingInputError(f"{p}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ScalingInputError(f"{p}:{e.lineno}: not JSON: {e.msg}") from None
    return fit_from_data(data, p)


def fit_from_data(data: Any, path: str | Path) -> Fit:
    """A fit from the parsed contents of the fit.json at `path` (named in errors)."""
    try:
        return Fit.from_json(data)
    except (KeyError, TypeError) as e:
        raise ScalingInputError(f"{path}: not a complete fit.json (missing {e})") from None
