"""moeforge search SEARCH: budget-constrained architecture search; moeforge search report: its leaderboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._common import add_overrides, console, print_json

EPILOG = """\
examples:
  moeforge search quickstart                          the shipped CPU search (a few minutes)
  moeforge search my.yaml --workers 4                 4 worker processes here (one per GPU if any)
  moeforge search my.yaml --storage postgresql://user@db/moe   run the same on every machine
  moeforge search report runs/search-quickstart       leaderboard and plots again
  moeforge search report --storage postgresql://user@db/moe --study quickstart --json

Rerunning the same command resumes the search (same run dir -> same storage and study).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search architectures with Optuna under a fixed training-FLOPs budget per trial",
        description="Run (or resume) the search a search spec describes: every trial's model spec comes from "
        "the base spec and the trial's parameters, is checked against the constraints before anything is "
        "built, and trains for the same training FLOPs. `moeforge search report RUN_DIR` prints the "
        "leaderboard of a run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec", nargs="?", metavar="SEARCH", help="a search spec (path or shipped name), or `report`"
    )
    p.add_argument("run_dir_arg", nargs="?", metavar="RUN_DIR", help="with `report`: the run dir")
    add_overrides(p)
    p.add_argument("--out", metavar="RUN_DIR", help="run dir (default runs/search-<name>)")
    p.add_argument(
        "--storage", metavar="URL", help="Optuna storage: postgresql://... to share a study across machines"
    )
    p.add_argument("--study", metavar="NAME", help="study name (default the search's name)")
    p.add_argument(
        "--workers", type=int, default=1, metavar="N", help="worker processes on this machine (default 1)"
    )
    p.add_argument(
        "--trials", type=int, metavar="N", help="trials to train, across all workers (overrides n_trials)"
    )
    p.add_argument(
        "--budget-flops", type=float, metavar="C", help="training FLOPs per trial (overrides budget)"
    )
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1 ... (overrides train.device)")
    p.add_argument("--json", action="store_true", help="print the result (or the report) as JSON")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fake-objective", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_INTERRUPTED
    from moeforge.search import RunConfig, SearchStop

    try:
        if args.worker is not None:
            return _worker(args)
        if args.spec == "report":
            return _report(args)
        if not args.spec:
            print(
                "moeforge search: give a SEARCH spec (a YAML path or a shipped name), or `report RUN_DIR`",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        if args.run_dir_arg:
            print(f"moeforge search: unexpected argument {args.run_dir_arg!r}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.workers < 1 or (args.trials is not None and args.trials < 1):
            print("moeforge search: --workers and --trials must be >= 1", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.budget_flops is not None and not args.budget_flops > 0:
            print("moeforge search: --budget-flops must be > 0", file=sys.stderr)
            return EXIT_BAD_INPUT
        from moeforge.search import load_search, run_search

        search = load_search(args.spec, args.overrides)
        update: dict[str, Any] = {}
        if args.trials is not None:
            update["n_trials"] = args.trials
        if args.budget_flops is not None:
            update["budget"] = search.budget.model_copy(update={"train_flops": args.budget_flops})
        if args.device:
            update["train"] = search.train.model_copy(update={"device": args.device})
        search = search.model_copy(update=update)
        run_dir = Path(args.out or f"runs/search-{search.name}")
        cfg = RunConfig(
            run_dir,
            args.storage,
            args.study,
            args.workers,
            args.device,
            args.fake_objective,
            not args.no_plots,
        )
        try:
            summary = run_search(search, cfg)
        except KeyboardInterrupt:
            print(
                f"interrupted; finished trials are kept in {run_dir}; rerun the same command to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        if args.json:
            print_json(summary)
        else:
            from moeforge.search import report

            _, records = report(run_dir, None, None, plots=False)
            render(records, search)
            print(f"results: {run_dir}/ (best.yaml, trials.json, trials.csv, plots/)")
        return EXIT_FAIL if summary.get("worker_errors") else 0
    except SearchStop as e:
        print(f"moeforge search: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (FileNotFoundError, ValueError) as e:
        print(f"moeforge search: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _worker(args: argparse.Namespace) -> int:
    from moeforge.search import RunConfig, run_one_worker

    run_dir = Path(args.out)
    cfg = RunConfig(run_dir, args.storage, args.study, 1, args.device, args.fake_objective)
    try:
        run_one_worker(run_dir, args.storage, args.study, args.worker, cfg)
    except KeyboardInterrupt:
        return 130
    return 0


def _report(args: argparse.Namespace) -> int:
    from moeforge.search import report

    run_dir = Path(args.run_dir_arg) if args.run_dir_arg else (Path(args.out) if args.out else None)
    search, records = report(
        run_dir, args.storage, args.study, plots=not args.no_plots and run_dir is not None
    )
    if args.json:
        print_json({"trials": records})
    else:
        render(records, search)
    return 0


def render(records: list[dict], search: Any) -> None:
    from rich import box
    from rich.table import Table

    from moeforge._format import count
    from moeforge.search import leaderboard

    con = console()
    metric = search.objective.metric
    names = list(dict.fromkeys(k for r in records for k in r["params"]))
    t = Table(
        title=f"search {search.name}: {search.budget.train_flops:.3g} training FLOPs per trial",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for col in ("#", "state", metric, *(["± seeds"] if len(search.seeds) > 1 else []), *names):
        t.add_column(col, justify="right", no_wrap=True)
    for col in ("experts", "params", "activated", "tokens"):
        t.add_column(col, justify="right", no_wrap=True)
    notes = []  # free text goes under the table, so the numbers keep their width on any terminal
    for r in leaderboard(records):
        if r["state"] == "WAITING":
            continue
        experts = (
            f"{r['shared_experts']}+{r['top_k']}/{r['routed_experts']}"
            if r["routed_experts"] is not None
            else "-"
        )
        note = r["infeasible"] or r["fail_reason"] or r["died"] or ""
        if r["reused_from"] is not None:
            note = f"same spec as #{r['reused_from']}"
        if note:
            notes.append(f"#{r['number']}: {note}")
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        state = "infeasible" if r["infeasible"] else _STATES.get(r["state"], r["state"].lower())
        row = [str(r["number"]) + ("*" if note else ""), state, value]
        if len(search.seeds) > 1:
            row.append(f"{r['value_std']:.4f}" if r["value_std"] is not None else "-")
        row += [str(r["params"].get(n, "")) for n in names]
        row += [
            experts,
            count(r["params_total"]) if r["params_total"] else "-",
            count(r["params_activated"]) if r["params_activated"] else "-",
            count(r["tokens"]) if r["tokens"] else "-",
        ]
        t.add_row(*row)
    con.print(t)
    for line in notes:
        con.print(f"  {line}", highlight=False, soft_wrap=True)


_STATES = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
