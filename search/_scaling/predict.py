"""Predictions under a fitted law: the compute-optimal N, D (and G) at a budget, by 6N or by moeforge's
exact accounting of specs realized from a search's best trial (`realize`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize_scalar

from .errors import ScalingInputError
from .fit import Fit, loss_ci95
from .runs import CSV_N, N_KINDS, n_words

if TYPE_CHECKING:
    from moeforge.compiler import ModelSpec

    from .._spec import SearchSpec


@dataclass
class Prediction:
    """The compute-optimal configuration at one budget and its predicted loss."""

    budget_flops: float
    params: float
    tokens: float
    granularity: float | None
    loss: float
    loss_ci: list[float]
    flops_per_token: float
    method: str
    """`6N` (continuous) or `accounting` (realized specs)."""
    size: float | None = None
    spec: ModelSpec | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    """The best configuration at each candidate G."""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "budget_flops": self.budget_flops,
            "params": self.params,
            "tokens": self.tokens,
            "granularity": self.granularity,
            "loss": self.loss,
            "loss_ci": self.loss_ci,
            "flops_per_token": self.flops_per_token,
            "method": self.method,
            "size": self.size,
            "candidates": self.candidates,
            "notes": self.notes,
        }


def optimum_6n(
    f: Fit,
    budget: float,
    g: float | None = None,
    constants: dict[str, float] | None = None,
    flops_per_token: tuple[float, float] = (6.0, 1.0),
) -> tuple[float, float]:
    """(N*, loss) minimising the law at D = C / (k N^s), (k, s) = `flops_per_token` (6N by default), by
    Brent's method on log N."""
    k, s = flops_per_token

    def loss(u: float) -> float:
        n = math.exp(u)
        return float(f.predict_loss(n, budget / (k * n**s), g, constants))

    hi = math.log((budget / (10 * k)) ** (1 / s))  # at least 10 tokens
    if hi <= math.log(10.0):
        raise ScalingInputError(
            f"--budget {budget:g}: too small for any model (10 parameters seeing 10 tokens take "
            f"{10 * k * 10**s:g} FLOPs)"
        )
    res = minimize_scalar(loss, bounds=(math.log(10.0), hi), method="bounded", options={"xatol": 1e-10})
    return math.exp(float(res.x)), float(res.fun)


def predict_optimum(
    f: Fit,
    budget: float,
    granularities: Sequence[float] = (1, 2, 4, 8, 16),
    flops_per_token: str = "auto",
    search: SearchSpec | None = None,
    base_params: dict[str, Any] | None = None,
) -> Prediction:
    """The compute-optimal N, D (and G, for laws with G) at `budget` training FLOPs.

    With `flops_per_token` "6N", or for runs that did not come from a search, D = C / (6 N) and N is
    optimised continuously. Otherwise ("auto" on a search's fit, or "accounting") candidate specs are
    realized from the best trial at the largest budget (`realize`), scaled over a log grid of sizes at
    each G, and D = C / their exact training FLOPs per token; the best realizable spec wins.

    Raises:
        ScalingInputError: a bad budget or candidate list, or accounting without a search spec.
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ScalingInputError(f"--budget {budget}: must be a positive number of FLOPs")
    law = f.law_obj
    gs: list[float | None] = [float(g) for g in granularities] if law.uses_g else [None]
    if law.uses_g and (not gs or any(g is None or g < 1 for g in gs)):
        raise ScalingInputError("--granularities: give G >= 1, comma-separated (1,2,4,8,16)")
    search = search or f.search_spec()
    base_params = base_params if base_params is not None else f.best_params
    if flops_per_token == "accounting" and (search is None or base_params is None):
        raise ScalingInputError(
            "--flops-per-token accounting needs a fit from a search (a run dir, or its fit.json); use 6N"
        )
    use_accounting = flops_per_token != "6N" and search is not None and base_params is not None
    if use_accounting:
        assert search is not None and base_params is not None
        return _range_note(f, _predict_accounting(f, budget, gs, search, base_params))
    return _range_note(f, _predict_6n(f, budget, gs))


def _range_note(f: Fit, p: Prediction) -> Prediction:
    if f.n_range and not f.n_range[0] / 2 <= p.params <= 2 * f.n_range[1]:
        lo, hi = f.n_range
        p.notes.append(
            f"N* = {p.params:.3g} is far outside the N the law was fitted on ({lo:.3g} to {hi:.3g})"
        )
    return p


def _predict_6n(f: Fit, budget: float, gs: Sequence[float | None]) -> Prediction:
    law = f.law_obj
    notes = []
    if f.n_kind not in ("activated_non_embedding", "activated", CSV_N):
        notes.append(f"6N treats N ({n_words(f.n_kind)}) as the parameters each token uses")
    cands: list[dict[str, Any]] = []
    for g in gs:
        n, loss = optimum_6n(f, budget, g)
        cands.append({"granularity": g, "params": n, "tokens": budget / (6 * n), "loss": loss})
    best = min(cands, key=lambda c: float(c["loss"]))
    if law.uses_g and best["granularity"] == max(g for g in gs if g is not None):
        notes.append(
            "the best G is the largest candidate: with 6N, finer experts cost nothing, so the law always prefers more"
        )
    return Prediction(
        budget_flops=budget,
        params=best["params"],
        tokens=best["tokens"],
        granularity=best["granularity"],
        loss=best["loss"],
        loss_ci=loss_ci95(f, best["params"], best["tokens"], best["granularity"]),
        flops_per_token=6 * best["params"],
        method="6N",
        candidates=cands,
        notes=notes,
    )


def realize(
    search: SearchSpec, base_params: dict[str, Any], size: float, granularity: float | None
) -> ModelSpec:
    """The model spec of `base_params` (a trial's) at scale factor `size` of the base spec's activated
    non-embedding parameters (the search's `size` axis, see SizeAxis) and segmentation m = `granularity`
    (None keeps the trial's). Expert widths stay divisible by every m of the space and `granularity`.

    Raises:
        Infeasible: no valid spec (an mla base, an m the expert widths cannot split into).
    """
    from .._space import trial_to_spec
    from .._spec import SizeAxis

    params = {**base_params, "size": float(size)}
    # Tolerance 1: any shape that comes close will do, since its parameters and FLOPs are counted exactly.
    update: dict[str, Any] = {"size": SizeAxis(factors=(float(size),), tolerance=1.0)}
    if granularity is not None:
        params["m"] = int(granularity)
        update["granularity"] = tuple(sorted({*(search.space.granularity or ()), int(granularity)}))
    return trial_to_spec(search.model_copy(update={"space": search.space.model_copy(update=update)}), params)


def _predict_accounting(
    f: Fit, budget: float, gs: Sequence[float | None], search: SearchSpec, base_params: dict[str, Any]
) -> Prediction:
    from moeforge.compiler import account

    from .._space import Infeasible, spec_key

    key = N_KINDS[f.n_kind]
    law = f.law_obj
    base = realize(search, base_params, 1.0, None)
    base_acc = account(base)
    n_base = getattr(base_acc, key)
    notes: list[str] = []
    cands = []
    best_spec: tuple[dict[str, Any], ModelSpec] | None = None
    seen: dict[str, dict[str, Any]] = {}
    for g in gs:
        # Center the scan on the continuous 6N optimum (in base-size factors); realizable sizes are discrete.
        n6, _ = optimum_6n(f, budget, g)
        center = n6 / n_base
        # ... plus a fixed 1/16x-64x grid, for when the law's optimum lies where no shape is realizable.
        factors = np.concatenate([center * np.exp(np.linspace(-2.5, 2.5, 41)), np.geomspace(1 / 16, 64, 25)])
        best_g: tuple[dict[str, Any], ModelSpec] | None = None
        for size in factors:
            try:
                spec = realize(search, base_params, float(size), g if law.uses_g else None)
            except Infeasible:
                continue
            k = spec_key(spec)
            if k not in seen:
                acc = account(spec)
                n = float(getattr(acc, key))
                fpt = float(acc.train_flops_per_token)
                d = budget / fpt
                loss = float(f.predict_loss(n, d, g))
                seen[k] = {
                    "granularity": g,
                    "params": n,
                    "tokens": d,
                    "loss": loss,
                    "flops_per_token": fpt,
                    "size": float(size),
                }
            c = seen[k]
            if math.isfinite(c["loss"]) and (best_g is None or c["loss"] < best_g[0]["loss"]):
                best_g = (c, spec)
        if best_g is None:
            notes.append(f"G={g}: no realizable spec")
            continue
        cands.append(best_g[0])
        if best_spec is None or best_g[0]["loss"] < best_spec[0]["loss"]:
            best_spec = best_g
    if best_spec is None:
        raise ScalingInputError(
            f"no spec realizable from the best trial at {budget:.3g} FLOPs at any candidate G"
        )
    c, spec = best_spec
    edge = [x["size"] for x in seen.values() if x["granularity"] == c["granularity"]]
    if c["size"] in (min(edge), max(edge)):
        notes.append("the optimum is at the edge of the scanned sizes")
    return Prediction(
        budget_flops=budget,
        params=c["params"],
        tokens=c["tokens"],
        granularity=c["granularity"],
        loss=c["loss"],
        loss_ci=loss_ci95(f, c["params"], c["tokens"], c["granularity"]),
        flops_per_token=c["flops_per_token"],
        method="accounting",
        size=c["size"],
        spec=spec,
        candidates=cands,
        notes=notes,
    )
