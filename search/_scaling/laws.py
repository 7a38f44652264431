"""Scaling laws: each a pure function of arrays, log L = f(theta, log N, log D, log G), plus its constants'
names, which of them are scales fitted in log space, and a starting grid. `LAWS` maps names to laws; the
fitter (`fit`), the bootstrap and the plots take a `Law` and know none of them by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .runs import Runs

Array = np.ndarray


def _cols(theta: Array) -> list[Array]:
    """theta (..., p) -> p arrays (..., 1) that broadcast against the data (n,)."""
    return [theta[..., i, None] for i in range(theta.shape[-1])]


def _logsumexp(*terms: Array) -> Array:
    """log(sum(exp(t))) over the terms, elementwise and stable (numpy's logaddexp, pairwise; scipy's
    logsumexp costs ten times as much on arrays this small, and the fitter calls this thousands of times)."""
    out = terms[0]
    for t in terms[1:]:
        out = np.logaddexp(out, t)
    return out


def chinchilla(
    theta: Array, log_n: Array, log_d: Array, log_g: Array | None = None, jac: bool = False
) -> Any:
    """log L for L = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2).

    theta = (e, a, b, alpha, beta) with E = exp(e), A = exp(a), B = exp(b): L is the irreducible loss E
    plus a term that falls with the parameters N and one that falls with the training tokens D. With
    `jac` (theta of shape (p,)), also d log L / d theta, shape (p, n): each term's share of L times the
    term's derivative.
    """
    e, a, b, alpha, beta = _cols(theta)
    t1, t2 = a - alpha * log_n, b - beta * log_d
    out = _logsumexp(e, t1, t2)
    if not jac:
        return out
    w0, w1, w2 = (np.exp(t - out) for t in np.broadcast_arrays(e, t1, t2))
    return out, np.stack([w0, w1, w2, -log_n * w1, -log_d * w2])


def krajewski(theta: Array, log_n: Array, log_d: Array, log_g: Array | None = None, jac: bool = False) -> Any:
    """log L for L = c + (g / G^gamma + a) / N^alpha + b / D^beta (Krajewski et al. 2024, "Scaling Laws
    for Fine-Grained Mixture of Experts", arXiv 2402.07871, eq. 9).

    theta = (c, a, b, g, alpha, beta, gamma), scales as logs (c = exp(theta[0]), ...). G is the
    granularity d_ff / d_expert, DeepSeekMoE's segmentation m; gamma says how fast finer experts pay, and
    a is what is left at infinite granularity. The paper's N is the *total* number of non-embedding
    parameters (section 5) of models whose expansion rate E (total / active expert parameters) is fixed
    at 64; its compute model F = (12 d_model^2 c_f + d_model E G c_r) D n_blocks (eq. 10) counts active
    parameters and routing. moeforge fits activated non-embedding parameters by default (`--n`): at a
    fixed expansion rate the two differ by a constant factor, which a and g absorb, so the exponents
    alpha, beta, gamma compare with the paper's either way, but a and g do not.
    """
    assert log_g is not None, "krajewski needs G"
    c, a, b, g, alpha, beta, gamma = _cols(theta)
    tg = g - gamma * log_g
    inner = np.logaddexp(tg, a)  # log(g / G^gamma + a)
    t1, t2 = inner - alpha * log_n, b - beta * log_d
    out = _logsumexp(c, t1, t2)
    if not jac:
        return out
    w0, w1, w2 = (np.exp(t - out) for t in np.broadcast_arrays(c, t1, t2))
    ug = np.exp(tg - inner)  # the granularity term's share of g / G^gamma + a
    return out, np.stack([w0, w1 * (1 - ug), w2, w1 * ug, -log_n * w1, -log_d * w2, -log_g * w1 * ug])


@dataclass(frozen=True)
class Law:
    """A scaling law: its function, constants (in the order of theta) and starting grid."""

    name: str
    fn: Callable[..., Array]
    constants: tuple[str, ...]
    """Names as reported; the first `n_scales` are scales fitted as their logs, the rest exponents."""
    n_scales: int
    grid: tuple[tuple[float, ...], ...]
    """Starting values of each entry of theta (logs for scales), as in Hoffmann et al.'s grid."""
    uses_g: bool
    formula: str
    published: dict[str, float] = field(default_factory=dict)
    """Published values to print beside a fit (only those that compare across setups)."""
    reference: str = ""

    def to_constants(self, theta: Array) -> dict[str, float]:
        k = self.n_scales
        vals = [math.exp(float(t)) for t in theta[:k]] + [float(t) for t in theta[k:]]
        return dict(zip(self.constants, vals, strict=True))

    def to_theta(self, constants: dict[str, float]) -> Array:
        k = self.n_scales
        vals = [constants[c] for c in self.constants]
        return np.array([math.log(v) for v in vals[:k]] + vals[k:], dtype=float)

    def bounds(self) -> list[tuple[float, float]]:
        return [(-50.0, 50.0)] * self.n_scales + [(0.0, 4.0)] * (len(self.constants) - self.n_scales)


_EXP = (0.1, 0.5, 1.0, 1.5)
LAWS: dict[str, Law] = {
    "chinchilla": Law(
        name="chinchilla",
        fn=chinchilla,
        constants=("E", "A", "B", "alpha", "beta"),
        n_scales=3,
        grid=((-1.0, -0.5, 0.0, 0.5, 1.0), (0, 5, 10, 15, 20, 25), (0, 5, 10, 15, 20, 25), _EXP, _EXP),
        uses_g=False,
        formula="L = E + A / N^alpha + B / D^beta",
        reference="Hoffmann et al. 2022, arXiv 2203.15556",
    ),
    "krajewski": Law(
        name="krajewski",
        fn=krajewski,
        constants=("c", "a", "b", "g", "alpha", "beta", "gamma"),
        n_scales=4,
        grid=(
            (-1.0, 0.0, 1.0),
            (0, 5, 10, 15, 20),
            (0, 5, 10, 15, 20, 25),
            (0, 5, 10, 15, 20),
            _EXP,
            _EXP,
            (0.1, 0.5, 1.0),
        ),
        uses_g=True,
        formula="L = c + (g / G^gamma + a) / N^alpha + b / D^beta",
        published={"alpha": 0.115, "beta": 0.147, "gamma": 0.58},
        reference="Krajewski et al. 2024, arXiv 2402.07871, table 1",
    ),
}
"""The laws by name (`moeforge scaling fit --law NAME`)."""


def closed_form_chinchilla(constants: dict[str, float], budget: float) -> tuple[float, float]:
    """Hoffmann et al.'s compute optimum for C = 6 N D: N* = G (C/6)^(beta/(alpha+beta)) with
    G = (alpha A / (beta B))^(1/(alpha+beta)), and D* = C / (6 N*)."""
    a, b, A, B = constants["alpha"], constants["beta"], constants["A"], constants["B"]
    g = (a * A / (b * B)) ** (1 / (a + b))
    n = g * (budget / 6) ** (b / (a + b))
    return n, budget / (6 * n)


def default_law(runs: Runs) -> str:
    """krajewski when the runs have two or more granularities, else chinchilla."""
    return "krajewski" if runs.has_g and len(runs.distinct_g()) >= 2 else "chinchilla"
