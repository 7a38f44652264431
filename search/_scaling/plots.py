"""Plots of a scaling-law fit, PNG (matplotlib) and HTML (plotly): IsoFLOP curves, loss against G,
extrapolation to a target budget, residuals. A plot that cannot be drawn is skipped, never fatal."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .fit import Fit, loss_ci95
from .predict import optimum_6n
from .runs import Runs, n_words


def write_scaling_plots(runs: Runs, fit: Fit, out_dir: str | Path, target: float | None = None) -> list[str]:
    """Write the fit's plots into `out_dir` as NAME.png and NAME.html; returns the names written.

    isoflop (loss against N, one line per budget, the law's curve through each budget's points and its
    minimum), loss_vs_G (when the runs have two or more G), extrapolation (when `target` FLOPs are given:
    the law's compute-optimal loss from the smallest budget to the target, with its 95% bootstrap band, and
    each budget's best run), residuals (observed / fitted - 1 for every run). A plot that fails leaves
    NAME.error.txt instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made: list[str] = []

    def save(name: str, draw: Callable[[], tuple[Any, Any]]) -> None:
        import matplotlib.pyplot as plt

        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                fig, html = draw()
                fig.savefig(out / f"{name}.png", dpi=110)  # each figure has its tight_layout already
                plt.close(fig)
                html.write_html(out / f"{name}.html", include_plotlyjs="directory")
            made.append(name)
        except Exception as e:  # noqa: BLE001 - a plot is never worth failing the command for
            plt.close("all")
            (out / f"{name}.error.txt").write_text(f"{type(e).__name__}: {e}\n")

    if len(runs):
        save("isoflop", lambda: _isoflop(runs, fit))
        if len(runs.distinct_g()) >= 2:
            save("loss_vs_G", lambda: _loss_vs_g(runs, fit))
        save("residuals", lambda: _residuals(runs, fit))
    if target is not None and fit.budgets:
        save("extrapolation", lambda: _extrapolation(runs, fit, target))
    return made


def _configs(runs: Runs) -> list[dict[str, Any]]:
    """One point per configuration: mean and std of its seeds' losses."""
    out = []
    for cfg, i, losses in runs.by_config():
        out.append(
            {
                "n": float(runs.n[i]),
                "d": float(runs.d[i]),
                "g": float(runs.g[i]),
                "budget": float(runs.budget[i]),
                "loss": float(losses.mean()),
                "std": float(losses.std(ddof=1)) if len(losses) > 1 else 0.0,
                "label": cfg["label"],
            }
        )
    return out


def _budget_curve(fit: Fit, pts: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The law along one budget's runs: log D against log N through its points (slope -1 with one
    point), at the G of the budget's best run; returns (N, loss, G)."""
    ns = np.array([p["n"] for p in pts])
    ds = np.array([p["d"] for p in pts])
    if len(set(ns)) >= 2:
        slope, icpt = np.polyfit(np.log(ns), np.log(ds), 1)
    else:
        slope, icpt = -1.0, float(np.log(ds[0]) + np.log(ns[0]))
    best = min(pts, key=lambda p: p["loss"])
    g = best["g"] if fit.law_obj.uses_g else None
    grid = np.exp(np.linspace(np.log(ns.min()) - 0.7, np.log(ns.max()) + 0.7, 80))
    d = np.exp(icpt + slope * np.log(grid))
    return grid, fit.predict_loss(grid, d, g), g


def _by_budget(pts: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    out: dict[float, list[dict[str, Any]]] = {}
    for p in sorted(pts, key=lambda p: (p["budget"], p["n"])):
        out.setdefault(p["budget"], []).append(p)
    return out


def _budget_figure(runs: Runs) -> tuple[Any, Any, Any, list[tuple[float, list[dict[str, Any]], Any, str]]]:
    """A figure (matplotlib fig and ax, plotly figure) for one line per budget, and per budget its
    configurations (`_configs`, by N) with a viridis color and the color's hex."""
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from matplotlib.colors import to_hex

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    html = go.Figure()
    colors = plt.get_cmap("viridis")
    groups = _by_budget(_configs(runs))
    budgets = []
    for i, (budget, pts) in enumerate(groups.items()):
        color = colors(i / max(1, len(groups) - 1))
        budgets.append((budget, pts, color, str(to_hex(color))))
    return fig, ax, html, budgets


def _isoflop(runs: Runs, fit: Fit) -> tuple[Any, Any]:
    import plotly.graph_objects as go

    fig, ax, html, budgets = _budget_figure(runs)
    for budget, pts, color, hexc in budgets:
        ax.errorbar(
            [p["n"] for p in pts],
            [p["loss"] for p in pts],
            yerr=[p["std"] for p in pts],
            fmt="o",
            color=color,
            capsize=2,
            label=f"{budget:.3g}",
        )
        grid, curve, g = _budget_curve(fit, pts)
        ax.plot(grid, curve, "-", color=color, alpha=0.8)
        k = int(np.argmin(curve))
        ax.plot([grid[k]], [curve[k]], "*", color=color, markersize=12, markeredgecolor="black")
        name = f"{budget:.3g} FLOPs" + (f" (G={g:g})" if g is not None else "")
        html.add_trace(
            go.Scatter(
                x=[p["n"] for p in pts],
                y=[p["loss"] for p in pts],
                error_y={"type": "data", "array": [p["std"] for p in pts]},
                mode="markers",
                name=name,
                marker={"color": hexc},
                text=[p["label"] for p in pts],
            )
        )
        html.add_trace(go.Scatter(x=grid, y=curve, mode="lines", name=f"{name}: fit", line={"color": hexc}))
        html.add_trace(
            go.Scatter(
                x=[grid[k]],
                y=[curve[k]],
                mode="markers",
                name=f"{name}: optimum",
                marker={"symbol": "star", "size": 14, "color": hexc},
            )
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({n_words(runs.n_kind)})")
    ax.set_ylabel("loss")
    ax.set_title(f"IsoFLOP curves, {fit.law} fit (stars: each budget's optimum)", fontsize=10)
    ax.legend(title="budget (FLOPs)", fontsize=8)
    fig.tight_layout()
    html.update_layout(
        title=f"IsoFLOP curves ({fit.law} fit)", xaxis_title="N", yaxis_title="loss", xaxis_type="log"
    )
    return fig, html


def _loss_vs_g(runs: Runs, fit: Fit) -> tuple[Any, Any]:
    """One line per budget (color) and model size (runs within half an octave of N): the runs' loss against
    G, solid with error bars, and the fit at the same N, D, G, dashed."""
    import plotly.graph_objects as go

    fig, ax, html, budgets = _budget_figure(runs)
    for budget, pts, color, hexc in budgets:
        lines: dict[float, list[dict[str, Any]]] = {}
        for p in pts:
            lines.setdefault(round(2 * math.log2(p["n"])) / 2, []).append(p)
        for j, line in enumerate(lines.values()):
            line = sorted(line, key=lambda p: p["g"])
            gs = [p["g"] for p in line]
            fitted = [
                float(fit.predict_loss(p["n"], p["d"], p["g"] if fit.law_obj.uses_g else None)) for p in line
            ]
            n = float(np.median([p["n"] for p in line]))
            ax.errorbar(
                gs,
                [p["loss"] for p in line],
                yerr=[p["std"] for p in line],
                fmt="o-",
                color=color,
                capsize=2,
                linewidth=1,
                label=f"{budget:.3g}" if j == 0 else None,
            )
            ax.plot(gs, fitted, "--", color=color, alpha=0.7, linewidth=1)
            name = f"{budget:.3g} FLOPs, N≈{n:.3g}"
            html.add_trace(
                go.Scatter(
                    x=gs,
                    y=[p["loss"] for p in line],
                    error_y={"type": "data", "array": [p["std"] for p in line]},
                    mode="lines+markers",
                    name=name,
                    line={"color": hexc},
                    text=[p["label"] for p in line],
                )
            )
            html.add_trace(
                go.Scatter(
                    x=gs, y=fitted, mode="lines", name=f"{name}: fit", line={"color": hexc, "dash": "dash"}
                )
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("granularity G (m)")
    ax.set_ylabel("loss")
    ax.set_title(f"loss against G, one line per budget and size (dashed: the {fit.law} fit)", fontsize=10)
    ax.legend(title="budget (FLOPs)", fontsize=8)
    fig.tight_layout()
    html.update_layout(title="loss against G", xaxis_title="G", yaxis_title="loss", xaxis_type="log")
    return fig, html


def _extrapolation(runs: Runs, fit: Fit, target: float) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    g = max(fit.granularities) if fit.law_obj.uses_g and fit.granularities else None
    lo = min(fit.budgets + [target])
    hi = max(fit.budgets + [target])
    cs = np.exp(np.linspace(math.log(lo), math.log(hi), 30))
    # FLOPs per token as the runs have them, k N^s fitted to their (N, flops / tokens): at small scale
    # attention and the head make them far more than 6N.
    fpt = runs.flops / runs.d
    if len(set(runs.n.tolist())) >= 2:
        s, log_k = np.polyfit(np.log(runs.n), np.log(fpt), 1)
    else:
        s, log_k = 1.0, float(np.log(np.median(fpt / runs.n)))
    k = float(np.exp(log_k))
    central, band_lo, band_hi = [], [], []
    for c in cs:
        n, loss = optimum_6n(fit, float(c), g, flops_per_token=(k, float(s)))
        central.append(loss)
        d = c / (k * n**s)
        lo_c, hi_c = loss_ci95(fit, n, d, g) if fit.samples else [loss, loss]
        band_lo.append(lo_c)
        band_hi.append(hi_c)
    best = []
    for b in sorted(set(runs.budget.tolist())):
        m = runs.budget == b
        best.append((b, float(runs.loss[m].min())))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.fill_between(cs, band_lo, band_hi, alpha=0.25, label="95% bootstrap band")
    label = f"compute-optimal loss, FLOPs/token {k:.3g} N^{s:.2f} as in the runs" + (
        f", G={g:g}" if g else ""
    )
    ax.plot(cs, central, "-", label=label)
    ax.plot([b for b, _ in best], [v for _, v in best], "o", label="best run per budget")
    ax.axvline(target, color="gray", linestyle=":", label=f"target {target:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("loss")
    ax.set_title(f"extrapolation of the {fit.law} fit", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    html = go.Figure()
    html.add_trace(
        go.Scatter(
            x=np.concatenate([cs, cs[::-1]]),
            y=band_hi + band_lo[::-1],
            fill="toself",
            name="95% band",
            opacity=0.3,
        )
    )
    html.add_trace(go.Scatter(x=cs, y=central, mode="lines", name="compute-optimal loss"))
    html.add_trace(
        go.Scatter(x=[b for b, _ in best], y=[v for _, v in best], mode="markers", name="best run per budget")
    )
    html.update_layout(
        title=f"extrapolation to {target:.3g} FLOPs",
        xaxis_title="FLOPs",
        yaxis_title="loss",
        xaxis_type="log",
    )
    return fig, html


def _residuals(runs: Runs, fit: Fit) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    pred = fit.predict_loss(runs.n, runs.d, runs.g if fit.law_obj.uses_g else None)
    rel = runs.loss / pred - 1
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    sc = ax.scatter(pred, rel, c=np.log10(runs.budget), cmap="viridis", s=18)
    fig.colorbar(sc, ax=ax, label="log10 budget")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("fitted loss")
    ax.set_ylabel("observed / fitted - 1")
    ax.set_title(f"residuals of the {fit.law} fit (RMSE {fit.rmse:.4g})", fontsize=10)
    fig.tight_layout()
    html = go.Figure(
        go.Scatter(
            x=pred,
            y=rel,
            mode="markers",
            marker={"color": np.log10(runs.budget), "colorscale": "Viridis", "showscale": True},
            text=[runs.configs[int(g)]["label"] for g in runs.group],
        )
    )
    html.update_layout(title="residuals", xaxis_title="fitted loss", yaxis_title="observed / fitted - 1")
    return fig, html
