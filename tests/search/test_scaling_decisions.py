"""Decision accuracy (`scaling fit`'s "decisions"): the share of configuration pairs at the held-out budget
that the law orders as measured, beside the next smaller budget's ranking (DataDecide's baseline)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from moeforge.search import Runs, fit_law, load_runs
from moeforge.search._scaling.decisions import pair_agreement

FIXTURE = Path(__file__).parents[1] / "fixtures" / "scaling" / "trials.json"
TRUTH = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.35, "beta": 0.37}
BUDGETS = (1e17, 3e17, 1e18, 3e18, 1e19)
SIZES = tuple(float(x) for x in np.geomspace(1e7, 1e9, 7))


def true_loss(n: float, d: float) -> float:
    return TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]


def ladder(extra_top: bool = False) -> Runs:
    """The same seven model sizes trained at every budget (one seed, no noise): the law's own losses, so a
    fit without the largest budget orders it exactly, while the next smaller budget's ranking flips the
    pairs whose order changes as D grows (its optimum is at a smaller N). `extra_top` adds a size
    measured only at the largest budget."""
    rows = [(n, c) for c in BUDGETS for n in SIZES]
    if extra_top:
        rows.append((3e8, BUDGETS[-1]))
    n = np.array([r[0] for r in rows])
    c = np.array([r[1] for r in rows])
    d = c / (6 * n)
    return Runs(
        n=n,
        d=d,
        g=np.full(len(n), math.nan),
        loss=np.array([true_loss(a, b) for a, b in zip(n, d, strict=True)]),
        budget=c,
        flops=c,
        group=np.arange(len(n)),
        seed=np.zeros(len(n)),
        configs=[{"label": str(i), "params": {"size": a, "budget": b}} for i, (a, b) in enumerate(rows)],
        source="synthetic",
    )


def test_pair_agreement_counts_flips_ties_and_skips_equal_measurements() -> None:
    # measured order a < b < c; the other ranking puts b first: (a, b) flipped, (a, c) and (b, c) right
    assert pair_agreement([1.0, 1.1, 1.2], [2.0, 1.9, 2.2]) == (pytest.approx(2 / 3), 3)
    assert pair_agreement([1.0, 1.1], [5.0, 5.0]) == (0.5, 1)  # a tie in the ranking: a coin flip
    share, pairs = pair_agreement([1.0, 1.0], [1.0, 2.0])  # equal measurements: no order to get right
    assert pairs == 0 and math.isnan(share)


def expected_smaller_share() -> float:
    """From the true law: the share of pairs of sizes whose order at 3e18 is their order at 1e19."""
    top, prev = BUDGETS[-1], BUDGETS[-2]
    right = [
        (true_loss(a, top / (6 * a)) < true_loss(b, top / (6 * b)))
        == (true_loss(a, prev / (6 * a)) < true_loss(b, prev / (6 * b)))
        for a, b in itertools.combinations(SIZES, 2)
    ]
    return sum(right) / len(right)


def test_a_true_law_orders_every_pair_while_the_smaller_budget_flips_some() -> None:
    fit = fit_law(ladder(), "chinchilla", resamples=0)
    d = fit.decisions
    assert d is not None and d["budget"] == 1e19 and d["smaller"] == 3e18
    assert d["pairs"] == 21 and d["configurations"] == 7 and d["skipped"] == 0
    assert d["law"] == 1.0
    expected = expected_smaller_share()
    assert expected < 1  # the optimum moves between the budgets, so some pairs flip
    assert d["smaller_budget"] == pytest.approx(expected)
    assert fit.summary()["decisions"] == d and type(fit).from_json(fit.to_json()).decisions == d


def test_configurations_measured_at_one_budget_only_are_skipped() -> None:
    d = fit_law(ladder(extra_top=True), "chinchilla", resamples=0).decisions
    assert d is not None and d["pairs"] == 21 and d["configurations"] == 7 and d["skipped"] == 1


def test_one_budget_has_no_decisions() -> None:
    runs = ladder()
    one = runs.subset(runs.budget == 1e19)
    assert fit_law(one, "chinchilla", resamples=0).decisions is None


def test_the_shipped_fixture_against_its_own_seed_means() -> None:
    """On tests/fixtures/scaling: the smaller budget's share recomputed here from trials.json (a
    configuration is its size and m), and the law, fitted on the two smaller budgets of a law with 1% noise,
    does at least as well."""
    fit = fit_law(load_runs(FIXTURE), resamples=0)
    d = fit.decisions
    means: dict[float, dict[tuple, float]] = {}
    for r in json.loads(FIXTURE.read_text()):
        if r["state"] == "COMPLETE" and not r["reused_from"] and not r["infeasible"]:
            means.setdefault(r["budget_flops"], {})[(r["size"], r["m"])] = float(np.mean(r["seed_values"]))
    top, prev = means[1e12], means[3e11]
    pairs = list(itertools.combinations(sorted(top), 2))
    right = sum((top[a] < top[b]) == (prev[a] < prev[b]) for a, b in pairs)
    assert d is not None and d["pairs"] == len(pairs) == 36 and d["skipped"] == 0
    assert d["smaller_budget"] == pytest.approx(right / len(pairs))
    assert d["smaller_budget"] < 1 and d["law"] >= d["smaller_budget"]
