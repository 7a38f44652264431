"""Decision accuracy at the held-out budget: how often a law orders two configurations as they measured,
beside how often the next smaller budget's own ranking does (DataDecide, Magnusson et al. 2025, arXiv
2504.11393: ranking at the small budget picks the larger budget's winner in about 80% of pairwise decisions;
a law earns its cost only by beating that).

A configuration is the same model at every budget: a search trial's params other than `budget` (the same
architecture and size), or for runs without params (a CSV) the same N and G. Its loss at a budget is the
mean over its seeds. Only configurations measured at both the held-out budget and the next smaller one
are compared; one found at only one of the two budgets is skipped (and counted in `skipped`). Pairs whose
measured means are equal are left out (no order to get right); a pair the law or the smaller budget ranks
as equal counts half (a coin flip).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from .runs import Runs

Array = np.ndarray


def identity(runs: Runs, gi: int) -> Hashable:
    """What makes configuration `gi` the same model at another budget: its params without `budget`, or
    (runs without params) its N and G."""
    params = {k: v for k, v in (runs.configs[gi].get("params") or {}).items() if k != "budget"}
    if params:
        return json.dumps(params, sort_keys=True, default=str)
    i = int(np.flatnonzero(runs.group == gi)[0])
    g = float(runs.g[i])
    return ("N", float(runs.n[i]), "G", g if math.isfinite(g) else None)


def _means(runs: Runs, budget: float) -> dict[Hashable, tuple[float, int]]:
    """Per configuration at `budget`: its identity -> (mean loss over seeds, index of its first run)."""
    out: dict[Hashable, tuple[float, int]] = {}
    for gi in sorted({int(x) for x in runs.group[runs.budget == budget]}):
        idx = np.flatnonzero(runs.group == gi)
        out[identity(runs, gi)] = (float(np.mean(runs.loss[idx])), int(idx[0]))
    return out


def pair_agreement(measured: Sequence[float], ranking: Sequence[float]) -> tuple[float, int]:
    """The share of pairs that `ranking` orders as `measured` does, and the number of pairs (those with
    distinct measured values); a pair `ranking` ties counts half. NaN share with no pairs."""
    right, pairs = 0.0, 0
    for i, j in itertools.combinations(range(len(measured)), 2):
        m = measured[i] - measured[j]
        if m == 0:
            continue
        pairs += 1
        r = ranking[i] - ranking[j]
        right += 0.5 if r == 0 else float((m > 0) == (r > 0))
    return (right / pairs if pairs else math.nan), pairs


def decision_accuracy(runs: Runs, predict: Callable[[Array, Array, Array], Array]) -> dict[str, Any] | None:
    """At the largest budget of `runs`: the share of configuration pairs that `predict` (the law fitted
    without that budget: (N, D, G) -> loss) orders as their seed means did, and the share that the next
    smaller budget's seed means order the same way. None with fewer than two budgets.

    Returns:
        {"law", "smaller_budget", "pairs", "budget", "smaller", "configurations", "skipped"}: the two
        shares (None without pairs), the pairs compared, the held-out and the smaller budget, how many
        configurations both budgets measured, and how many were measured at only one of them.
    """
    budgets = runs.budgets()
    if len(budgets) < 2:
        return None
    top, prev = budgets[-1], budgets[-2]
    at_top, at_prev = _means(runs, top), _means(runs, prev)
    common = [k for k in at_top if k in at_prev]
    measured = [at_top[k][0] for k in common]
    idx = np.array([at_top[k][1] for k in common], dtype=int)
    predicted: list[float] = (
        [float(x) for x in predict(runs.n[idx], runs.d[idx], runs.g[idx])] if common else []
    )
    law, pairs = pair_agreement(measured, predicted)
    smaller, _ = pair_agreement(measured, [at_prev[k][0] for k in common])
    return {
        "law": law if pairs else None,
        "smaller_budget": smaller if pairs else None,
        "pairs": pairs,
        "budget": top,
        "smaller": prev,
        "configurations": len(common),
        "skipped": len(at_top) + len(at_prev) - 2 * len(common),
    }
