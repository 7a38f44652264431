"""What a search leaves in its run dir: trials.json / trials.csv, best.yaml, plots (PNG and HTML)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from moeforge.compiler import ModelSpec, spec_to_yaml
from optuna.trial import TrialState

from ._branching import ladder_compute
from ._records import RECORD_KEYS, TrialRecord, trial_record, trial_records
from ._seeds import seed_stats, tied
from ._spec import SearchSpec
from ._summary import SearchResult
from ._trials import best_trial, counted


def write_results(study: optuna.Study, search: SearchSpec, run_dir: Path, plots: bool = True) -> SearchResult:
    """Write trials.json, trials.csv, best.yaml and the plots; returns a short summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = trial_records(study)
    (run_dir / "trials.json").write_text(
        json.dumps([r.to_dict() for r in records], indent=2, default=str) + "\n"
    )
    _write_csv(run_dir / "trials.csv", records)
    best = best_trial(study)
    if best is not None and "spec" in best.user_attrs:
        spec = ModelSpec.model_validate(best.user_attrs["spec"])
        spec = spec.model_copy(update={"name": f"{search.name}-best"})
        header = f"Best of search {search.name!r}: {evidence(search, records, best.number)}"
        header += comparable_on(trial_record(best))
        (run_dir / "best.yaml").write_text(spec_to_yaml(spec, header=header))
    made = write_plots(study, search, run_dir, records) if plots else []
    return SearchResult(
        trials=len(records),
        counted=len(counted(study.get_trials(deepcopy=False))),
        complete=sum(r.state == "COMPLETE" and r.reused_from is None for r in records),
        failed=sum(
            r.state == "FAIL" and r.fail_reason is not None and not r.retried and r.reused_from is None
            for r in records
        ),
        best=trial_record(best) if best else None,
        branched_tokens=ladder_compute(records),
        plots=made,
    )


def comparable_on(rec: TrialRecord) -> str:
    """best.yaml's line on what its numbers are comparable with: the environment the trial trained in and
    its data (runtime/_environment.py says why the last digits differ across machines)."""
    env, data = rec.environment, rec.data_fingerprint
    if not env and not data:
        return ""
    parts = (
        [f"moeforge {env['moeforge']}, torch {env['torch']}, {env['device']}, {env['threads']} threads"]
        if env
        else []
    )
    if data:
        parts.append(f"data fingerprint {data}")
    return (
        "\nTrained with "
        + "; ".join(parts)
        + ". Losses agree to the last digit on the same environment and data;"
        " elsewhere the last digits differ (CPU and GPU kernels add in another order)."
    )


def _write_csv(path: Path, records: list[TrialRecord]) -> None:
    param_names = sorted({k for r in records for k in r.params})
    skip = ("params", "values", "load", "constraints", "environment", "branch_point")
    cols = [k for k in RECORD_KEYS if k not in skip]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols[:4] + [f"param:{p}" for p in param_names] + cols[4:] + ["load"])
        for r in records:
            row = [getattr(r, c) for c in cols]
            params = [r.params.get(p) for p in param_names]
            load = json.dumps(r.load) if r.load is not None else None
            w.writerow(row[:4] + params + row[4:] + [load])


# ---------------------------------------------------------------------------------------------- plots
def write_plots(
    study: optuna.Study, search: SearchSpec, run_dir: Path, records: list[TrialRecord]
) -> list[str]:
    """PNG (matplotlib) and HTML (plotly) plots; each one that cannot be drawn yet is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as pv
    import optuna.visualization.matplotlib as pm

    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = search.objective.metric
    multi = search.objective.params_total
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "reused_from" not in t.user_attrs
    ]
    made: list[str] = []
    target = (lambda t: t.values[0]) if multi else None
    target_name = metric

    def save(name: str, mpl: Any, html: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = mpl()
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.savefig(out_dir / f"{name}.png", dpi=110, bbox_inches="tight")
                plt.close(fig)
                html().write_html(out_dir / f"{name}.html", include_plotlyjs="directory")
            made.append(name)
        except Exception as e:  # noqa: BLE001 - a plot is never worth failing the search for
            (out_dir / f"{name}.error.txt").write_text(f"{type(e).__name__}: {e}\n")

    if complete:
        save(
            "history",
            lambda: pm.plot_optimization_history(study, target=target, target_name=target_name),
            lambda: pv.plot_optimization_history(study, target=target, target_name=target_name),
        )
    n_params = len({k for t in complete for k in t.params})
    if len(complete) >= 2 and n_params > 1:
        save(
            "importances",
            lambda: pm.plot_param_importances(study, target=target, target_name=target_name),
            lambda: pv.plot_param_importances(study, target=target, target_name=target_name),
        )
    if multi and complete:
        save(
            "pareto",
            lambda: pm.plot_pareto_front(study, target_names=[metric, "params_total"]),
            lambda: pv.plot_pareto_front(study, target_names=[metric, "params_total"]),
        )
    if search.budget.ladder:
        made += _scaling_plots(search, records, out_dir)
    done = [r for r in records if r.state == "COMPLETE" and r.reused_from is None]
    axes = {
        "m": ("segmentation m", "shared_experts", "K_s"),
        "shared_experts": ("shared experts K_s", "m", "m"),
    }
    for key, (label, other, other_label) in axes.items():
        xs = [getattr(r, key) for r in done if getattr(r, key) is not None]
        if len(set(xs)) >= 2:
            name = f"loss_vs_{'m' if key == 'm' else 'K_s'}"
            # One line per value of the other axis; error bars are the spread over seeds.
            pts = [
                (getattr(r, key), r.value, r.value_std or 0.0, f"{other_label}={getattr(r, other)}", r.number)
                for r in done
                if getattr(r, key) is not None
            ]
            save(
                name,
                lambda pts=pts, label=label: _scatter_mpl(pts, label, metric),
                lambda pts=pts, label=label: _scatter_html(pts, label, metric),
            )
    return made


def _scaling_plots(search: SearchSpec, records: list[TrialRecord], out_dir: Path) -> list[str]:
    """A ladder's IsoFLOP profiles, loss against G and residuals under the default law's fit (no
    bootstrap: `moeforge scaling fit` gives the intervals); nothing while the runs are too few to fit."""
    # Imported here, not above: scipy only when a ladder is plotted.
    from ._scaling.errors import FitFailed, ScalingInputError
    from ._scaling.fit import fit_law
    from ._scaling.plots import write_scaling_plots
    from ._scaling.runs import runs_from_records

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs = runs_from_records(records, search=search)
            fit = fit_law(runs, resamples=0, holdout=False)
    except (ScalingInputError, FitFailed) as e:
        (out_dir / "scaling.error.txt").write_text(f"no scaling fit yet: {e}\n")
        return []
    (out_dir / "scaling.error.txt").unlink(missing_ok=True)
    return write_scaling_plots(runs, fit, out_dir)


def _groups(pts: list[tuple]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for p in sorted(pts):
        out.setdefault(p[3], []).append(p)
    return out


def _scatter_mpl(pts: list[tuple], xlabel: str, ylabel: str) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for group, gp in _groups(pts).items():
        ax.errorbar(
            [p[0] for p in gp],
            [p[1] for p in gp],
            yerr=[p[2] for p in gp],
            marker="o",
            capsize=3,
            label=group,
        )
        for x, y, _, _, n in gp:
            ax.annotate(f"#{n}", (x, y), fontsize=7, alpha=0.6, xytext=(4, 2), textcoords="offset points")
    ax.set_xticks(sorted({p[0] for p in pts}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(f"{ylabel} against {xlabel} (bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    return ax


def _scatter_html(pts: list[tuple], xlabel: str, ylabel: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for group, gp in _groups(pts).items():
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in gp],
                y=[p[1] for p in gp],
                error_y={"type": "data", "array": [p[2] for p in gp]},
                mode="lines+markers",
                name=group,
                text=[f"trial {p[4]}" for p in gp],
            )
        )
    fig.update_layout(title=f"{ylabel} against {xlabel}", xaxis_title=xlabel, yaxis_title=ylabel)
    return fig


# ----------------------------------------------------------------------------------------- leaderboard
def leaderboard(records: list[TrialRecord]) -> list[TrialRecord]:
    """Complete trials that trained, best first; then pruned, failed and infeasible ones."""
    order = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}

    def key(r: TrialRecord) -> tuple:
        kind = 5 if r.infeasible else (6 if r.reused_from is not None else order.get(r.state, 7))
        budget = -(r.params.get("budget") or 0.0)  # a ladder: the largest budget first
        return (kind, budget, r.value if r.value is not None else float("inf"), r.number)

    return sorted(records, key=key)


def _trained(records: list[TrialRecord]) -> list[TrialRecord]:
    """Complete trials that trained themselves (not reused results) and have a value."""
    return [r for r in records if r.state == "COMPLETE" and r.reused_from is None and r.value is not None]


def _value(r: TrialRecord) -> float:
    """A trained trial's value (`_trained` keeps only those with one)."""
    assert r.value is not None
    return r.value


_VERDICT = {True: "tied", False: "", None: "1 seed"}
"""`tied`'s answer as the leaderboards write it."""


def _seed_values(r: TrialRecord) -> list[float]:
    return list(r.seed_values or ([r.value] if r.value is not None else []))


def evidence(search: SearchSpec, records: list[TrialRecord], number: int) -> str:
    """Why trial `number` is the best, for best.yaml's header: its value over seeds, the runner-up among
    trials of the same budget, the gap, and whether the gap is within the seed noise (`TIE_RULE`)."""
    by_number = {r.number: r for r in records}
    best = by_number[number]
    metric = search.objective.metric
    mine = _seed_values(best)
    mean, std = seed_stats(mine)
    spread = (
        f" +- {std:.4f} over {len(mine)} seeds {best.seeds}"
        if std is not None
        else " (1 seed: no noise estimate)"
    )
    budget = best.budget_flops
    lines = [
        f"trial {number}, {metric} = {mean:.4f}{spread}",
        f"params: {json.dumps(best.params)}; trained on {budget:.3g} FLOPs per seed",
    ]
    rivals = [r for r in _trained(records) if r.number != number and r.budget_flops == budget]
    if rivals:
        second = min(rivals, key=_value)
        gap = _value(second) - mean
        tie = tied(mine, _seed_values(second))
        verdict = {
            True: "within the seed noise: tied",
            False: "beyond the seed noise",
            None: "no noise estimate",
        }[tie]
        lines.append(
            f"runner-up: trial {second.number} ({json.dumps(second.params)}) at {second.value:.4f}, "
            f"gap {gap:.4f} ({verdict})"
        )
    else:
        lines.append("runner-up: none (the only complete trial at this budget)")
    return "\n".join(lines)


def noise_marks(records: list[TrialRecord]) -> dict[int, str]:
    """For each complete trial that trained: "best" (of its budget), "tied" (within the seed noise of the
    best, `TIE_RULE`), "" (beyond it), or "1 seed" (no noise estimate)."""
    done = _trained(records)
    out: dict[int, str] = {}
    for budget in {r.budget_flops for r in done}:
        group = [r for r in done if r.budget_flops == budget]
        best = min(group, key=_value)
        for r in group:
            tie = tied(_seed_values(best), _seed_values(r))
            out[r.number] = "best" if r is best else _VERDICT[tie]
    return out
