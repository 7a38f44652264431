"""Seed noise: the one rule every leaderboard uses to tell a real gap from noise (search report, best.yaml,
scaling tables). Standard library only, so `moeforge scaling` on a CSV imports no Optuna."""

from __future__ import annotations

import statistics

TIE_RULE = "tied: the gap to the best mean is under 2 * sqrt(s_best^2/n_best + s^2/n) (s: std over n seeds)"
"""How leaderboards decide that an entry is within the seed noise of the best (docs/search.md quotes it)."""


def seed_stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation over seeds (None with one seed: no noise estimate)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def tied(best: list[float], other: list[float]) -> bool | None:
    """Whether `other`'s mean is within the seed noise of `best`'s (`TIE_RULE`); None when either has
    one seed, so there is no noise estimate."""
    if len(best) < 2 or len(other) < 2:
        return None
    (mb, sb), (mo, so) = seed_stats(best), seed_stats(other)
    assert sb is not None and so is not None
    se = (sb**2 / len(best) + so**2 / len(other)) ** 0.5
    return abs(mo - mb) < 2 * se
