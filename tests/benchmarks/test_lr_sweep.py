"""benchmarks/lr_sweep.py's fit: the lr rule comes from its sweep table, so the fit is checked on a table
whose answer is known (no training)."""

from __future__ import annotations

import math

import pytest

from benchmarks.lr_sweep import _fit, _table


def _row(n: int, lr: float, best: float) -> dict:
    # a loss that is a parabola in log lr around `best`
    return {
        "size": n,
        "N": n,
        "tokens": 1,
        "batch_size": 1,
        "steps": 1,
        "warmup_tokens": 1,
        "lr": lr,
        "loss": 2.0 + 0.1 * (math.log(lr) - math.log(best)) ** 2,
    }


def test_fit_recovers_a_power_law_from_interior_optima():
    rows = []
    for n in (3_000, 10_000, 50_000):
        best = 4.0 * n**-0.7
        grid = [best * 1.3 * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]  # the optimum off the grid points
        rows += [_row(n, lr, best) for lr in grid]
    table = _table(rows)
    a, b = _fit(table)
    assert b == pytest.approx(0.7, rel=1e-6) and a == pytest.approx(4.0, rel=1e-6)
    for t in table.values():
        assert t["flat"] and t["best_lr"] in t["flat"]
