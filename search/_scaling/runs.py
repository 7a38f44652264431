"""The data a law is fitted to: one entry per training run (a configuration at one seed), read from a
search's trial records (a run dir, through its study, or a trials.json) or from a CSV."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .._records import TrialRecord, records_from_json
from .errors import ScalingInputError

if TYPE_CHECKING:
    from .._spec import SearchSpec

Array = np.ndarray


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
    records: Sequence[TrialRecord],
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
        if r.state != "COMPLETE" or r.reused_from is not None or r.infeasible:
            continue
        num = r.number
        for col in (n_key, "tokens"):
            if not _finite_positive(getattr(r, col)):
                raise ScalingInputError(
                    f"{source}: trial {num}: {col} is {getattr(r, col)!r}, not a positive number"
                    + (
                        " (trials.json from an older moeforge? try --n activated or --n total)"
                        if col == n_key
                        else ""
                    )
                )
        budget_v = r.budget_flops or r.train_flops
        flops_v = r.train_flops or budget_v
        if not _finite_positive(budget_v) or not _finite_positive(flops_v):
            raise ScalingInputError(f"{source}: trial {num}: no positive budget_flops or train_flops")
        assert budget_v is not None and flops_v is not None
        budget, flops = float(budget_v), float(flops_v)
        values: list[Any] | None = r.seed_values
        seeds = r.seeds
        if values is None:
            values, seeds = [r.value], [0]
        elif seeds is None or len(seeds) != len(values):
            seeds = list(range(len(values)))
        key: tuple[Any, ...] = (r.spec_key or f"trial-{num}", float(budget))
        if key not in index:
            index[key] = len(configs)
            configs.append(
                {
                    "label": f"#{num}",
                    "number": num,
                    "params": dict(r.params),
                    "spec_key": r.spec_key,
                    "m": r.m,
                    "K_s": r.shared_experts,
                    "experts": (
                        f"{r.shared_experts}+{r.top_k}/{r.routed_experts}"
                        if r.routed_experts is not None
                        else "-"
                    ),
                    # an older trials.json without the key: the sampled size
                    "size": r.size if r.size is not None else r.params.get("size"),
                }
            )
        m = r.m
        g = float(m) if m is not None and _finite_positive(m) else math.nan
        for seed, v in zip(seeds, values, strict=True):
            if not _finite_positive(v):
                dropped.append(f"trial {num} seed {seed} (loss {v!r})")
                continue
            cols["n"].append(float(getattr(r, n_key)))
            cols["d"].append(float(cast(int, r.tokens)))
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

    A run dir with run.json is read through its study (as `report` reads it), which also gives the search spec that
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


def _read_study(run_dir: Path) -> tuple[SearchSpec, list[TrialRecord]]:
    """A run dir's search spec and trial records, read from its study without rewriting the run dir's
    results (a fit reads a search; it never changes it)."""
    # Imported here, not above: reading a CSV or a trials.json imports no Optuna.
    from .._study import read_study

    return read_study(run_dir)


def _read_json_records(path: Path) -> list[TrialRecord]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingInputError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ScalingInputError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
    try:
        return records_from_json(data, str(path))
    except ValueError as e:
        raise ScalingInputError(str(e)) from None


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
