"""Scaling laws fitted to search results: the laws, the fit, the bootstrap, the holdout and predictions.

A law is a pure function of arrays, log L = f(theta, log N, log D, log G), plus its constants' names,
which of them are scales fitted in log space, and a starting grid; `LAWS` maps names to laws. The fitter,
the bootstrap and the plots are shared and know no law.

The fit follows Hoffmann et al. 2022 (appendix D.2) as Epoch's replication does it (Besiroglu et al.
2024, arXiv 2404.10102): minimise the Huber loss (delta 1e-3) of log L_pred - log L over the runs, with
log L_pred a logsumexp of log terms (E = exp(e), A = exp(a), ...), by L-BFGS-B (scipy) from the best
points of a grid of starts; the best optimum is kept. Confidence intervals come from a bootstrap that
resamples configurations (a spec at a budget) with all their seeds, so seed noise is not counted as
independent evidence.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:
    from moeforge.compiler import ModelSpec

    from ._spec import SearchSpec


class ScalingInputError(ValueError):
    """The data cannot be fitted as given (a one-line message for the user; exit 2)."""


class FitFailed(RuntimeError):
    """No start of the optimizer converged (exit 1)."""


# ------------------------------------------------------------------------------------------------- laws
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


def n_words(kind: str) -> str:
    """What N counts, in words: 'activated non-embedding parameters', or the CSV's column."""
    return (
        "the CSV's params column"
        if kind == CSV_N
        else kind.replace("_", " ").replace("non ", "non-") + " parameters"
    )


N_KINDS = {
    "activated_non_embedding": "params_activated_non_embedding",
    "activated": "params_activated",
    "total": "params_total",
    "non_embedding": "params_non_embedding",
}
"""`--n` choices -> the trials.json key that holds that parameter count."""


# ------------------------------------------------------------------------------------------------- runs
_COLS = ("n", "d", "g", "loss", "budget", "flops", "group", "seed")
"""The per-run columns of `Runs`, in order."""


@dataclass
class Runs:
    """One entry per training run (a configuration at one seed): what a law is fitted to."""

    n: Array
    d: Array
    g: Array
    """Granularity G (m); NaN where the data have none."""
    loss: Array
    budget: Array
    """The budget each run belongs to (its search budget, or the CSV's flops)."""
    flops: Array
    group: Array
    """Configuration index: seeds of one configuration share it (resampled together)."""
    seed: Array
    configs: list[dict[str, Any]]
    """Per configuration: label, params (a search trial's), spec_key, m, K_s, experts, size, number."""
    n_kind: str = "activated_non_embedding"
    source: str = ""
    dropped: list[str] = field(default_factory=list)
    """Rows dropped for a non-finite or non-positive loss, named."""
    search: SearchSpec | None = None

    def __len__(self) -> int:
        return len(self.loss)

    @property
    def has_g(self) -> bool:
        return bool(len(self.g)) and bool(np.all(np.isfinite(self.g)))

    def distinct_g(self) -> list[float]:
        return sorted({float(x) for x in self.g if np.isfinite(x)})

    def budgets(self) -> list[float]:
        return sorted({float(b) for b in self.budget})

    def subset(self, mask: Array) -> Runs:
        keep = np.flatnonzero(mask)
        r = _runs(
            {k: getattr(self, k)[keep] for k in _COLS}, self.configs, self.n_kind, self.source, self.dropped
        )
        r.search = self.search
        return r

    def by_config(self) -> Iterator[tuple[dict[str, Any], int, Array]]:
        """Per configuration (every one has runs): its entry in `configs`, its first run's index and its
        runs' losses."""
        for gi, cfg in enumerate(self.configs):
            idx = np.flatnonzero(self.group == gi)
            yield cfg, int(idx[0]), self.loss[idx]

    def points(self) -> int:
        """Distinct (N, D, G) points: what a law's constants are fitted to (seeds only average noise)."""
        return len({(float(a), float(b), float(c)) for a, b, c in zip(self.n, self.d, self.g, strict=True)})


def _finite_positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def runs_from_records(
    records: Sequence[dict[str, Any]],
    n_kind: str = "activated_non_embedding",
    source: str = "trials.json",
    search: SearchSpec | None = None,
) -> Runs:
    """A search's trial records (trials.json) as runs: each complete, trained (not reused, not infeasible)
    trial gives one run per seed (`seeds` zipped with `seed_values`; [value] at seed 0 without them).

    Raises:
        ScalingInputError: a record lacks the numbers a run needs (the key and the trial say which).
    """
    if n_kind not in N_KINDS:
        raise ScalingInputError(f"--n {n_kind}: choose one of {', '.join(N_KINDS)}")
    n_key = N_KINDS[n_kind]
    cols: dict[str, list[float]] = {k: [] for k in _COLS}
    configs: list[dict[str, Any]] = []
    dropped: list[str] = []
    index: dict[tuple, int] = {}
    for r in records:
        if r.get("state") != "COMPLETE" or r.get("reused_from") is not None or r.get("infeasible"):
            continue
        num = r.get("number")
        for col in (n_key, "tokens"):
            if not _finite_positive(r.get(col)):
                raise ScalingInputError(
                    f"{source}: trial {num}: {col} is {r.get(col)!r}, not a positive number"
                    + (
                        " (trials.json from an older moeforge? try --n activated or --n total)"
                        if col == n_key
                        else ""
                    )
                )
        budget_v = r.get("budget_flops") or r.get("train_flops")
        flops_v = r.get("train_flops") or budget_v
        if not _finite_positive(budget_v) or not _finite_positive(flops_v):
            raise ScalingInputError(f"{source}: trial {num}: no positive budget_flops or train_flops")
        assert budget_v is not None and flops_v is not None
        budget, flops = float(budget_v), float(flops_v)
        values = r.get("seed_values")
        seeds = r.get("seeds")
        if values is None:
            values, seeds = [r.get("value")], [0]
        elif seeds is None or len(seeds) != len(values):
            seeds = list(range(len(values)))
        key: tuple[Any, ...] = (r.get("spec_key") or f"trial-{num}", float(budget))
        if key not in index:
            index[key] = len(configs)
            configs.append(
                {
                    "label": f"#{num}",
                    "number": num,
                    "params": dict(r.get("params") or {}),
                    "spec_key": r.get("spec_key"),
                    "m": r.get("m"),
                    "K_s": r.get("shared_experts"),
                    "experts": (
                        f"{r.get('shared_experts')}+{r.get('top_k')}/{r.get('routed_experts')}"
                        if r.get("routed_experts") is not None
                        else "-"
                    ),
                    "size": r.get("size", (r.get("params") or {}).get("size")),
                }
            )
        m = r.get("m")
        g = float(m) if m is not None and _finite_positive(m) else math.nan
        for seed, v in zip(seeds, values, strict=True):
            if not _finite_positive(v):
                dropped.append(f"trial {num} seed {seed} (loss {v!r})")
                continue
            cols["n"].append(float(r[n_key]))
            cols["d"].append(float(r["tokens"]))
            cols["g"].append(g)
            cols["loss"].append(float(v))
            cols["budget"].append(float(budget))
            cols["flops"].append(float(flops))
            cols["group"].append(index[key])
            cols["seed"].append(seed)
    runs = _runs(cols, configs, n_kind, source, dropped)
    runs.search = search
    return runs


def _runs(
    cols: Mapping[str, Sequence[float] | Array],
    configs: list[dict],
    n_kind: str,
    source: str,
    dropped: list[str],
) -> Runs:
    arr = {k: np.asarray(v, dtype=float) for k, v in cols.items()}
    used = sorted({int(x) for x in arr["group"]})
    remap = {old: new for new, old in enumerate(used)}  # configurations whose every seed was dropped go
    return Runs(
        n=arr["n"],
        d=arr["d"],
        g=arr["g"],
        loss=arr["loss"],
        budget=arr["budget"],
        flops=arr["flops"],
        group=np.array([remap[int(x)] for x in arr["group"]], dtype=int),
        seed=arr["seed"],
        configs=[configs[i] for i in used],
        n_kind=n_kind,
        source=source,
        dropped=dropped,
    )


CSV_N = "params"
"""A CSV's N kind: whatever its params column counts (`--n` does not apply)."""

CSV_COLUMNS = ("params", "tokens", "loss")
"""Required CSV columns; `granularity` (G) is needed by laws that use it, `flops` and `seed` are used
when present, anything else is ignored."""


def runs_from_csv(path: Path) -> Runs:
    """A CSV with one row per run (columns `params`, `tokens`, `loss`, and `granularity`, `flops`,
    `seed` when present). A run's budget is its `flops`, or 6 N D to two significant digits, so runs
    planned on one IsoFLOP budget group together. Rows with the same params, tokens, granularity and
    flops are one configuration (its seeds).

    Raises:
        ScalingInputError: `file:line: column: problem` for a missing or non-numeric value.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingInputError(f"{path}: cannot read: {e}") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ScalingInputError(
            f"{path}:1: column {missing[0]}: missing (the header has {', '.join(header) or 'nothing'}; "
            f"needs {', '.join(CSV_COLUMNS)}, and granularity for laws with G)"
        )
    cols: dict[str, list[float]] = {k: [] for k in _COLS}
    configs: list[dict[str, Any]] = []
    index: dict[tuple, int] = {}
    dropped: list[str] = []

    def number(row: dict, col: str, line: int, required: bool) -> float:
        raw = (row.get(col) or "").strip()
        if not raw:
            if required:
                raise ScalingInputError(f"{path}:{line}: column {col}: empty")
            return math.nan
        try:
            return float(raw)
        except ValueError:
            raise ScalingInputError(f"{path}:{line}: column {col}: {raw!r} is not a number") from None

    for i, row in enumerate(reader):
        line = i + 2  # the header is line 1
        if not any((v or "").strip() for v in row.values()):
            continue
        n, d = number(row, "params", line, True), number(row, "tokens", line, True)
        for col, v in (("params", n), ("tokens", d)):
            if not (math.isfinite(v) and v > 0):
                raise ScalingInputError(f"{path}:{line}: column {col}: {v:g} is not a positive number")
        loss = number(row, "loss", line, False) if (row.get("loss") or "").strip() else math.nan
        g = number(row, "granularity", line, False) if "granularity" in header else math.nan
        if "granularity" in header and not (math.isnan(g) or g > 0):
            raise ScalingInputError(f"{path}:{line}: column granularity: {g:g} is not a positive number")
        flops = number(row, "flops", line, False) if "flops" in header else math.nan
        if math.isfinite(flops) and flops <= 0:
            raise ScalingInputError(f"{path}:{line}: column flops: {flops:g} is not a positive number")
        seed = number(row, "seed", line, False) if "seed" in header else math.nan
        if not (math.isfinite(loss) and loss > 0):
            dropped.append(f"{path.name}:{line} (loss {(row.get('loss') or '').strip()!r})")
            continue
        budget = flops if math.isfinite(flops) else float(f"{6 * n * d:.2g}")
        key = (n, d, g if math.isfinite(g) else None, budget)
        if key not in index:
            index[key] = len(configs)
            configs.append(
                {
                    "label": f"line {line}",
                    "number": None,
                    "params": {},
                    "spec_key": None,
                    "m": g if math.isfinite(g) else None,
                    "K_s": None,
                    "experts": "-",
                    "size": None,
                }
            )
        cols["n"].append(n)
        cols["d"].append(d)
        cols["g"].append(g)
        cols["loss"].append(loss)
        cols["budget"].append(budget)
        cols["flops"].append(flops if math.isfinite(flops) else 6 * n * d)
        cols["group"].append(index[key])
        cols["seed"].append(seed if math.isfinite(seed) else 0)
    return _runs(cols, configs, CSV_N, str(path), dropped)


def load_runs(source: str | Path, n_kind: str = "activated_non_embedding") -> Runs:
    """Runs from a search run dir, a trials.json, or a CSV (see `runs_from_records`, `runs_from_csv`).

    A run dir with run.json is read through its study (`report`), which also gives the search spec that
    `predict` realizes specs with; a plain trials.json is read as it is (no search spec).

    Raises:
        ScalingInputError: a missing or unreadable source, or bad rows.
    """
    path = Path(source)
    if path.is_dir():
        search = None
        records = None
        if (path / "run.json").is_file():
            try:
                search, records = _read_study(path)
            except Exception as e:  # noqa: BLE001 - the study is optional; trials.json may still be there
                if not (path / "trials.json").is_file():
                    raise ScalingInputError(f"{path}: cannot read the study: {e}") from None
        if records is None:
            if not (path / "trials.json").is_file():
                raise ScalingInputError(f"{path}: not a search run dir (no trials.json or run.json)")
            records = _read_json_records(path / "trials.json")
        return runs_from_records(records, n_kind, str(path), search)
    if not path.is_file():
        raise ScalingInputError(f"{path}: no such file or directory")
    if path.suffix.lower() == ".csv":
        return runs_from_csv(path)
    return runs_from_records(_read_json_records(path), n_kind, str(path))


def _read_study(run_dir: Path) -> tuple[SearchSpec, list[dict[str, Any]]]:
    """A run dir's search spec and trial records, read from its study as `report` does, without rewriting
    the run dir's results (a fit reads a search; it never changes it)."""
    from ._driver import report
    from ._run import is_rdb

    info = json.loads((run_dir / "run.json").read_text())
    storage = info["storage"]
    if not is_rdb(storage) and not Path(storage).is_absolute():
        storage = str(run_dir / storage)
    return report(None, storage, info["study"], plots=False)


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingInputError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ScalingInputError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("trials"), list):
        data = data["trials"]  # `moeforge search report --json`
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ScalingInputError(f"{path}: expected a list of trial records (trials.json)")
    return data


# ---------------------------------------------------------------------------------------------- fitting
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
        )

    def search_spec(self) -> SearchSpec | None:
        if self.search is None:
            return None
        from ._spec import SearchSpec

        return SearchSpec.model_validate(self.search)


def default_law(runs: Runs) -> str:
    """krajewski when the runs have two or more granularities, else chinchilla."""
    return "krajewski" if runs.has_g and len(runs.distinct_g()) >= 2 else "chinchilla"


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
            held = {
                "budget": top,
                "mean_abs_rel_error": float(np.mean(np.abs(tp - test.loss) / test.loss)),
                "n_points": len(test),
            }
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


def best_params(runs: Runs) -> dict[str, Any] | None:
    """The params of the configuration with the lowest mean loss at the largest budget (a search's)."""
    if not len(runs):
        return None
    top = max(runs.budget)
    means: dict[int, float] = {}
    for gi in sorted({int(x) for x in runs.group[runs.budget == top]}):
        means[gi] = float(np.mean(runs.loss[runs.group == gi]))
    gi = min(means, key=lambda k: means[k])
    params = runs.configs[gi].get("params")
    return dict(params) if params else None


# ------------------------------------------------------------------------------------------- prediction
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


def _loss_ci(f: Fit, n: float, d: float, g: float | None) -> list[float]:
    if not f.samples:
        return [math.nan, math.nan]
    vals = np.array([float(f.predict_loss(n, d, g, s)) for s in f.samples])
    return _ci95(vals[np.isfinite(vals)])


def _ci95(vals: Sequence[float] | Array) -> list[float]:
    """The central 95% interval (2.5th and 97.5th percentiles) of `vals`; [nan, nan] when empty."""
    if not len(vals):
        return [math.nan, math.nan]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


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
        loss_ci=_loss_ci(f, best["params"], best["tokens"], best["granularity"]),
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
    from ._space import trial_to_spec
    from ._spec import SizeAxis

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

    from ._space import Infeasible, spec_key

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
        loss_ci=_loss_ci(f, c["params"], c["tokens"], c["granularity"]),
        flops_per_token=c["flops_per_token"],
        method="accounting",
        size=c["size"],
        spec=spec,
        candidates=cands,
        notes=notes,
    )


def closed_form_chinchilla(constants: dict[str, float], budget: float) -> tuple[float, float]:
    """Hoffmann et al.'s compute optimum for C = 6 N D: N* = G (C/6)^(beta/(alpha+beta)) with
    G = (alpha A / (beta B))^(1/(alpha+beta)), and D* = C / (6 N*)."""
    a, b, A, B = constants["alpha"], constants["beta"], constants["A"], constants["B"]
    g = (a * A / (b * B)) ** (1 / (a + b))
    n = g * (budget / 6) ** (b / (a + b))
    return n, budget / (6 * n)


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
