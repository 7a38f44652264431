"""moeforge scaling fit SOURCE: a scaling law fitted to runs; moeforge scaling predict FIT: the optimum."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from . import _types as T
from ._common import console, print_json

EPILOG = """\
examples:
  moeforge search scaling --out runs/scaling --workers 2     the shipped study: 3 budgets x 4 sizes x m 1,2,4
  moeforge scaling fit runs/scaling                           fit its runs (a run dir, or its trials.json)
  moeforge scaling fit runs/scaling --out runs/scaling/fit    also fit.json and the plots
  moeforge scaling fit runs.csv --law chinchilla --json       any runs: params, tokens, loss[, granularity, ...]
  moeforge scaling predict runs/scaling/fit/fit.json --budget 4.5e12 --spec best.yaml   what to train next
  moeforge scaling check runs/scaling/fit/fit.json --budget 4.5e12 --out runs/check   does the law hold there?

SOURCE is a search run dir, a trials.json, or a CSV with one row per run. From a search, every complete
trial gives one run per seed; a configuration's seeds are resampled together by the bootstrap.
"""

SOURCE_HELP = (
    "a search run dir, its trials.json, or a CSV with columns params, tokens, loss (granularity for laws with "
    "G; flops and seed when present)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scaling",
        help="fit scaling laws (Chinchilla, Krajewski et al.'s granularity law) to runs; predict the optimum",
        description="Fit a scaling law to the runs of a search (or a CSV) like Hoffmann et al. and Epoch's "
        "replication do (Huber loss on log loss, L-BFGS-B from a grid of starts), with bootstrap intervals "
        "and a holdout of the largest budget; then predict the compute-optimal model at a bigger budget.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    f = verbs.add_parser(
        "fit",
        help="fit a law: constants with 95%% intervals, RMSE, holdout error, per-budget table",
        description="Fit a scaling law to SOURCE and print its constants with 95% bootstrap intervals "
        "(configurations resampled with their seeds), the RMSE of the fitted loss, the error on the "
        "largest budget's runs when it is left out of the fit, and each budget's configurations (mean ± "
        "std over seeds, entries tied with the best within seed noise marked).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    _fit_options(f)
    f.add_argument(
        "--out",
        type=T.out_dir,
        metavar="DIR",
        help="write DIR/fit.json (what predict reads) and the plots (PNG, HTML)",
    )
    f.add_argument(
        "--target",
        type=T.positive_float,
        metavar="C",
        help="with --out: also plot the extrapolation to C training FLOPs",
    )
    f.add_argument("--json", action="store_true", help="print the fit as JSON (only JSON on stdout)")
    f.set_defaults(run=run_fit)

    q = verbs.add_parser(
        "predict",
        help="the compute-optimal N, D (and G) at a budget, and the loss the fit predicts",
        description="The compute-optimal configuration at --budget C training FLOPs under a fitted law: "
        "N*, D* (and the best G among --granularities for laws with G) and the predicted loss with its "
        "95% interval over the bootstrap fits. For a fit of a search's runs, candidate specs are realized "
        "from the best trial at the largest budget (scaled like the search's size axis, at each G) and "
        "counted exactly, so D = C / their training FLOPs per token; otherwise D = C / (6 N). --law, --n, "
        "--resamples and --seed apply when FIT is a SOURCE, fitted first.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("fit", metavar="FIT", help="a fit.json from `scaling fit --out`, or a SOURCE to fit now")
    q.add_argument(
        "--budget", type=T.positive_float, required=True, metavar="C", help="training FLOPs, e.g. 1e21"
    )
    q.add_argument(
        "--granularities",
        default="1,2,4,8,16",
        type=T.positive_floats,
        metavar="G,...",
        help="candidate granularities (m) for laws with G (default 1,2,4,8,16)",
    )
    q.add_argument(
        "--flops-per-token",
        choices=("auto", "6N", "accounting"),
        default="auto",
        help="how a model's training FLOPs per token are counted: auto (moeforge's accounting of realized "
        "specs for a search's fit, else 6N), 6N (continuous N), accounting",
    )
    q.add_argument(
        "--spec",
        metavar="OUT.yaml",
        help="write the model spec that realizes the optimum (fits of a search only)",
    )
    _fit_options(q)
    q.add_argument("--json", action="store_true", help="print the prediction as JSON (only JSON on stdout)")
    q.set_defaults(run=run_predict)

    k = verbs.add_parser(
        "check",
        help="train the predicted optimum and the largest budget's best at a new budget: did the law hold?",
        description="Check a law at a budget it never saw: train, with the study's own training rules (its "
        "search spec: train options, hparams rule, seeds, data), the optimum `scaling predict` gives for "
        "--budget C and the best configuration of the study's largest budget, and print each one's "
        "predicted loss (95% interval) against its measured loss (mean over the study's seeds). Exit 0 when "
        "every measured loss lies inside its interval, 1 otherwise. Runs go to --out DIR, one folder per "
        "spec, budget and seed: a finished one is reused and an interrupted one resumes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument("fit", metavar="FIT", help="a fit.json of a search's runs, or a search run dir to fit now")
    k.add_argument(
        "--budget", type=T.positive_float, required=True, metavar="C", help="training FLOPs, e.g. 4.5e12"
    )
    k.add_argument(
        "--out", type=T.out_dir, required=True, metavar="DIR", help="where the runs (and check.json) go"
    )
    k.add_argument(
        "--granularities",
        default="1,2,4,8,16",
        type=T.positive_floats,
        metavar="G,...",
        help="candidate granularities (m) of the predicted optimum, as for predict (default 1,2,4,8,16)",
    )
    k.add_argument("--device", type=T.device, help="cpu, cuda, ... (default the study's train.device)")
    _fit_options(k)
    k.add_argument("--json", action="store_true", help="print the check as JSON (only JSON on stdout)")
    k.set_defaults(run=run_check)


def _fit_options(p: argparse.ArgumentParser, resamples_min: int = 0) -> None:
    p.add_argument(
        "--law",
        choices=("chinchilla", "krajewski"),
        help="chinchilla: L = E + A/N^alpha + B/D^beta; krajewski: L = c + (g/G^gamma + a)/N^alpha + b/D^beta "
        "(default krajewski when the runs have two or more G, else chinchilla)",
    )
    p.add_argument(
        "--n",
        dest="n_kind",
        choices=("activated_non_embedding", "activated", "total", "non_embedding"),
        default="activated_non_embedding",
        help="which parameter count is N (default activated_non_embedding: the parameters each token uses, "
        "without embedding and head)",
    )
    p.add_argument(
        "--resamples",
        type=T.int_in(resamples_min, 100_000),
        default=200,
        metavar="K",
        help="bootstrap resamples (default 200; 0: none)",
    )
    p.add_argument("--seed", type=T.seed, default=0, help="the bootstrap's random seed (default 0)")


def _fail(msg: str, code: int) -> int:
    print(f"moeforge scaling: {msg}", file=sys.stderr)
    return code


def run_fit(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL
    from moeforge.search import FitFailed, ScalingInputError

    try:
        runs, fit = _fit_source(args.source, args)
        files: list[str] = []
        if args.out:
            files = _write_out(Path(args.out), runs, fit, args.target)
    except ScalingInputError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except FitFailed as e:
        return _fail(str(e), EXIT_FAIL)
    if args.json:
        print_json({**_clean(fit.summary()), "configurations": _config_rows(runs, fit), "files": files})
        return 0
    _render_fit(runs, fit, files)
    return 0


def _fit_source(source: str, args: argparse.Namespace) -> tuple[Any, Any]:
    from moeforge.search import ScalingInputError, fit_law, load_runs

    if args.resamples < 0:
        raise ScalingInputError("--resamples must be >= 0")
    runs = load_runs(source, args.n_kind)
    if runs.dropped:
        shown = ", ".join(runs.dropped[:5]) + (
            f" and {len(runs.dropped) - 5} more" if len(runs.dropped) > 5 else ""
        )
        print(
            f"moeforge scaling: warning: dropped {len(runs.dropped)} run(s) with a non-finite or non-positive "
            f"loss: {shown}",
            file=sys.stderr,
        )
    return runs, fit_law(runs, args.law, resamples=args.resamples, seed=args.seed)


def _write_out(out: Path, runs: Any, fit: Any, target: float | None) -> list[str]:
    from moeforge.search import write_scaling_plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(_clean(fit.to_json()), indent=2) + "\n")
    made = write_scaling_plots(runs, fit, out, target)
    return [str(out / "fit.json")] + [str(out / f"{m}.png") for m in made]


def _clean(obj: Any) -> Any:
    """NaN and infinities as null, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _config_rows(runs: Any, fit: Any) -> list[dict[str, Any]]:
    """Each configuration at its budget: mean ± std over seeds, whether it is the budget's best or tied
    with it within seed noise (`moeforge.search.tied`), and the fitted loss."""
    from moeforge.search import seed_stats, tied

    rows = []
    by_budget: dict[float, list[dict[str, Any]]] = {}
    for cfg, i, losses in runs.by_config():
        values = [float(v) for v in losses]
        mean, std = seed_stats(values)
        g = float(runs.g[i])
        row = {
            "config": cfg["label"],
            "budget": float(runs.budget[i]),
            "params": float(runs.n[i]),
            "tokens": float(runs.d[i]),
            "granularity": g if math.isfinite(g) else None,
            "K_s": cfg.get("K_s"),
            "experts": cfg.get("experts"),
            "size": cfg.get("size"),
            "seeds": len(values),
            "loss_mean": mean,
            "loss_std": std,
            "fitted": float(fit.predict_loss(runs.n[i], runs.d[i], g if fit.law_obj.uses_g else None)),
            "_values": values,
        }
        by_budget.setdefault(row["budget"], []).append(row)
    for budget in sorted(by_budget):
        group = sorted(by_budget[budget], key=lambda r: r["loss_mean"])
        best = group[0]
        for r in group:
            r["best"] = r is best
            r["tied"] = None if r is best else tied(best["_values"], r["_values"])
            rows.append(r)
    for r in rows:
        del r["_values"]
    return rows


def _render_fit(runs: Any, fit: Any, files: list[str]) -> None:
    from rich import box
    from rich.table import Table

    from moeforge._format import count
    from moeforge.search import TIE_RULE, n_words

    con = console()
    law = fit.law_obj
    budgets = ", ".join(f"{b:.3g}" for b in fit.budgets)
    con.print(f"scaling fit: {law.name}, {law.formula}", highlight=False)
    con.print(
        f"  {fit.n_points} runs ({len(runs.configs)} configurations) at {len(fit.budgets)} budget(s) ({budgets} "
        f"FLOPs); N = {n_words(fit.n_kind)}; from {fit.source}",
        highlight=False,
    )
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    t.add_column("constant")
    t.add_column("value", justify="right")
    t.add_column("95% interval", justify="right")
    if law.published:
        t.add_column("Krajewski et al.", justify="right")
    for c in law.constants:
        lo, hi = fit.ci[c]
        row = [c, f"{fit.constants[c]:.4g}", f"{lo:.4g} - {hi:.4g}" if math.isfinite(lo) else "-"]
        if law.published:
            row.append(f"{law.published[c]:g}" if c in law.published else "")
        t.add_row(*row)
    con.print(t)
    b = fit.bootstrap
    con.print(
        f"  bootstrap: {b['converged']}/{b['resamples']} resamples of the configurations with their seeds "
        f"converged (seed {b['seed']})",
        highlight=False,
    )
    if law.published:
        con.print(
            f"  published: {law.reference}; their N is total non-embedding parameters at expansion rate 64, so "
            "only the exponents compare",
            highlight=False,
        )
    for w in fit.warnings:
        con.print(f"  warning: {w}", highlight=False)
    con.print(f"  RMSE of the fitted loss: {fit.rmse:.4g}", highlight=False)
    if fit.holdout:
        h = fit.holdout
        con.print(
            f"  holdout: fitted without the {h['budget']:.3g} budget, its {h['n_points']} runs are predicted with "
            f"mean |relative error| {h['mean_abs_rel_error']:.2%}"
            + (
                f" ({h['mean_abs_rel_error_configs']:.2%} over its {h['n_configs']} configurations' seed means)"
                if "mean_abs_rel_error_configs" in h
                else ""
            ),
            highlight=False,
        )
    else:
        con.print(f"  {fit.holdout_note or 'no holdout'}", highlight=False)
    _render_decisions(con, fit.decisions)

    rows = _config_rows(runs, fit)
    for budget in sorted({r["budget"] for r in rows}):
        t = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            title=f"budget {budget:.3g} FLOPs",
            title_justify="left",
        )
        for col in ("config", "N", "D", "G", "K_s", "experts", "loss", "fit", ""):
            t.add_column(col, justify="left" if col in ("config", "") else "right")
        for r in (r for r in rows if r["budget"] == budget):
            loss = f"{r['loss_mean']:.4f}" + (f" ± {r['loss_std']:.4f}" if r["loss_std"] is not None else "")
            if r["best"]:
                mark = "best" + ("" if r["seeds"] > 1 else " (1 seed: no noise estimate)")
            elif r["tied"] is None:
                mark = "1 seed: no noise estimate"
            else:
                mark = "tied" if r["tied"] else ""
            t.add_row(
                r["config"],
                count(int(r["params"])),
                count(int(r["tokens"])),
                f"{r['granularity']:g}" if r["granularity"] is not None else "-",
                str(r["K_s"]) if r["K_s"] is not None else "-",
                r["experts"] or "-",
                loss,
                f"{r['fitted']:.4f}",
                mark,
            )
        con.print(t)
    con.print(f"  {TIE_RULE}", highlight=False)
    if files:
        con.print(f"wrote {', '.join(files)}", highlight=False)


def _render_decisions(con: Any, d: dict[str, Any] | None) -> None:
    """The decision accuracy line(s) under the holdout (nothing without a holdout)."""
    if d is None:
        return
    skipped = (
        f"; {d['skipped']} configuration(s) measured at only one of the two budgets skipped"
        if d["skipped"]
        else ""
    )
    if not d["pairs"]:
        con.print(
            f"  decisions: no pair of configurations measured at both {d['budget']:.3g} and {d['smaller']:.3g} "
            f"FLOPs to compare{skipped}",
            highlight=False,
        )
        return
    con.print(
        f"  decisions at {d['budget']:.3g} FLOPs ({d['pairs']} pairs of {d['configurations']} configurations, "
        f"seed means): the law orders {d['law']:.0%} as measured, the {d['smaller']:.3g} budget's ranking "
        f"{d['smaller_budget']:.0%}{skipped}",
        highlight=False,
    )


def run_check(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL
    from moeforge.search import FitFailed, ScalingInputError, check_law

    try:
        gs = _granularities(args.granularities)
        fit = _load_or_fit(args)
        check = check_law(
            fit,
            args.budget,
            Path(args.out),
            gs,
            device=args.device,
            log=lambda line: print(f"moeforge scaling check: {line}", file=sys.stderr),
        )
    except ScalingInputError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except FitFailed as e:
        return _fail(str(e), EXIT_FAIL)
    except Exception as e:  # noqa: BLE001 - a training that fails (diverged, out of memory) is one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return _fail(f"check: training failed: {type(e).__name__}{': ' + first if first else ''}", EXIT_FAIL)
    if args.json:
        print_json(_clean({**check.summary(), "law": fit.law, "n": fit.n_kind, "fit": str(args.fit)}))
    else:
        _render_check(fit, check)
    return 0 if check.held else EXIT_FAIL


def _granularities(text: str) -> list[float]:
    from moeforge.search import ScalingInputError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ScalingInputError(f"--granularities {text!r}: give numbers, e.g. 1,2,4,8,16") from None


def _render_check(fit: Any, check: Any) -> None:
    from rich import box
    from rich.table import Table

    from moeforge._format import count
    from moeforge.search import n_words, tied

    con = console()
    con.print(
        f"scaling check: the {fit.law} fit of {fit.source} at {check.budget_flops:.3g} training FLOPs, "
        f"{check.metric} over seeds {', '.join(map(str, check.seeds))}",
        highlight=False,
    )
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("configuration", "N", "D", "G", "predicted", "95% interval", "measured", ""):
        t.add_column(col, justify="left" if col in ("configuration", "") else "right")
    for r in check.runs:
        lo, hi = r.interval
        std = f" ± {r.std:.4f}" if r.std is not None else ""
        t.add_row(
            r.what,
            count(int(r.params)),
            count(int(r.tokens)),
            f"{r.granularity:g}" if r.granularity is not None else "-",
            f"{r.predicted:.4f}",
            f"{lo:.4f} - {hi:.4f}",
            f"{r.mean:.4f}{std}",
            "inside" if r.held else ("below" if r.mean < lo else "above"),
        )
    con.print(t)
    con.print(f"  N = {n_words(fit.n_kind)}; runs in {check.out}", highlight=False)
    opt, best = check.runs
    same = tied(best.measured, opt.measured)
    gap = opt.mean - best.mean
    noise = (
        "within the seed noise"
        if same
        else ("1 seed: no noise estimate" if same is None else "beyond the seed noise")
    )
    side = "above (worse than)" if gap > 0 else "below (better than)"
    if opt.spec_key == best.spec_key:
        con.print("  the law's optimum is the best of the largest budget itself (one spec)", highlight=False)
    else:
        con.print(
            f"  the law's optimum measured {abs(gap):.4f} {side} the best of the largest budget ({noise})",
            highlight=False,
        )
    if check.held:
        con.print("law held: every measured loss lies inside its predicted 95% interval", highlight=False)
    else:
        missed = ", ".join(r.what for r in check.runs if not r.held)
        con.print(f"law did not hold: outside the predicted 95% interval: {missed}", highlight=False)


def run_predict(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL
    from moeforge.search import FitFailed, ScalingInputError

    try:
        fit = _load_or_fit(args)
        pred = _predict(fit, args)
        written = _write_spec(fit, pred, args.spec) if args.spec else None
    except ScalingInputError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except FitFailed as e:
        return _fail(str(e), EXIT_FAIL)
    if args.json:
        print_json(_clean({**pred.summary(), "law": fit.law, "n": fit.n_kind, "spec": written}))
        return 0
    _render_prediction(fit, pred, written)
    return 0


def _load_or_fit(args: argparse.Namespace) -> Any:
    from moeforge.search import fit_from_data

    path = Path(args.fit)
    if path.is_file() and path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and "format" in data:
            return fit_from_data(data, path)
    return _fit_source(args.fit, args)[1]


def _predict(fit: Any, args: argparse.Namespace) -> Any:
    from moeforge.search import ScalingInputError, predict_optimum

    try:
        gs = [float(x) for x in args.granularities.split(",") if x.strip()]
    except ValueError:
        raise ScalingInputError(
            f"--granularities {args.granularities!r}: give numbers, e.g. 1,2,4,8,16"
        ) from None
    if args.spec and args.flops_per_token == "6N":
        raise ScalingInputError(
            "--spec needs specs realized by moeforge's accounting; drop --flops-per-token 6N"
        )
    if args.spec and fit.search is None:
        raise ScalingInputError(
            f"--spec needs a fit of a search's runs (a run dir or its fit.json); this fit is of {fit.source}, "
            "which has no search spec to realize"
        )
    return predict_optimum(fit, args.budget, gs, args.flops_per_token)


def _write_spec(fit: Any, pred: Any, out: str) -> str:
    from moeforge.compiler import load_spec, spec_to_yaml
    from moeforge.search import ScalingInputError, n_words

    if pred.spec is None:
        raise ScalingInputError("--spec: this prediction realized no spec (a fit without a search spec)")
    name = f"{fit.search['name']}-optimal-{pred.budget_flops:.0e}".replace("+", "")
    spec = pred.spec.model_copy(update={"name": name})
    lo, hi = pred.loss_ci
    header = (
        f"Compute-optimal model at {pred.budget_flops:.3g} training FLOPs under a {fit.law} fit of {fit.source}\n"
        f"(moeforge scaling predict): N = {pred.params:,.0f} {n_words(fit.n_kind)}, "
        f"D = {pred.tokens:,.0f} tokens, G = {pred.granularity}\n"
        f"predicted loss {pred.loss:.4f} (95% interval {lo:.4f} - {hi:.4f}); scale factor {pred.size:.4g} of "
        "the search's base, from its best trial at the largest budget"
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec_to_yaml(spec, header=header))
    load_spec(path)  # validated as any spec file is (raises SpecError -> exit 2)
    return str(path)


def _render_prediction(fit: Any, pred: Any, written: str | None) -> None:
    from rich import box
    from rich.table import Table

    from moeforge._format import count
    from moeforge.search import n_words

    con = console()
    lo, hi = pred.loss_ci
    con.print(
        f"scaling predict: {pred.budget_flops:.3g} training FLOPs under the {fit.law} fit of {fit.source}",
        highlight=False,
    )
    g = f", G* = {pred.granularity:g}" if pred.granularity is not None else ""
    con.print(
        f"  N* = {count(int(pred.params))} ({n_words(fit.n_kind)}), D* = {count(int(pred.tokens))} "
        f"tokens ({pred.tokens / pred.params:.1f} per parameter){g}",
        highlight=False,
    )
    ci = f"{lo:.4f} - {hi:.4f}" if math.isfinite(lo) else "-"
    con.print(
        f"  predicted loss {pred.loss:.4f} (95% interval {ci} over {len(fit.samples)} bootstrap fits)",
        highlight=False,
    )
    how = (
        f"moeforge's accounting of specs realized from the best trial (scale x{pred.size:.3g} of the base)"
        if pred.method == "accounting"
        else "6N"
    )
    con.print(f"  training FLOPs per token: {count(int(pred.flops_per_token))} ({how})", highlight=False)
    if len(pred.candidates) > 1:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col in ("G", "N", "D", "loss"):
            t.add_column(col, justify="right")
        for c in pred.candidates:
            t.add_row(
                f"{c['granularity']:g}", count(int(c["params"])), count(int(c["tokens"])), f"{c['loss']:.4f}"
            )
        con.print(t)
    for note in pred.notes:
        con.print(f"  note: {note}", highlight=False)
    if written:
        con.print(f"wrote {written}", highlight=False)
