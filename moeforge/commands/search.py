"""moeforge search SEARCH: budget-constrained architecture search; moeforge search report: its leaderboard."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _types as T
from ._common import add_overrides, console, print_json
from ._tracking import add_log_flag, check_log_flag

if TYPE_CHECKING:
    from moeforge.search import SearchResult, TrialRecord

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
    p.add_argument("--out", type=T.out_dir, metavar="RUN_DIR", help="run dir (default runs/search-<name>)")
    p.add_argument(
        "--storage",
        type=T.storage,
        metavar="URL",
        help="Optuna storage: postgresql://... to share a study across machines",
    )
    p.add_argument("--study", metavar="NAME", help="study name (default the search's name)")
    p.add_argument(
        "--workers",
        default="auto",
        metavar="N",
        help="worker processes on this machine (default auto: one per GPU, or on CPU the cores divided by "
        "train.cpu_threads; never more than the trials)",
    )
    p.add_argument(
        "--trials",
        type=T.int_in(1, 10**6),
        metavar="N",
        help="trials to train, across all workers (overrides n_trials)",
    )
    p.add_argument(
        "--budget-flops",
        type=T.positive_float,
        metavar="C",
        help="training FLOPs per trial (overrides budget)",
    )
    p.add_argument(
        "--device", type=T.device, metavar="DEV", help="cpu, cuda, cuda:1 ... (overrides train.device)"
    )
    add_log_flag(p)
    p.add_argument(
        "--json", action="store_true", help="print the result (or the report) as JSON (live display off)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument(
        "--wide",
        action="store_true",
        help="leaderboard: every column, full names, even wider than the terminal",
    )
    p.add_argument("--worker", type=T.int_in(0, 4096), help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_INTERRUPTED
    from moeforge.search import RunConfig, SearchStop

    try:
        if check_log_flag("search", args.log):
            return EXIT_BAD_INPUT
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
        workers = None if args.workers == "auto" else _positive_int(args.workers)
        if workers == 0:  # --trials and --budget-flops are checked by their types when parsed
            print("moeforge search: --workers: must be a number >= 1 or auto", file=sys.stderr)
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
        if (run_dir / "train_config.json").is_file() and not (run_dir / "run.json").is_file():
            print(
                f"moeforge search: --out: {run_dir} holds a `moeforge train` run; give another folder",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        cfg = RunConfig(run_dir, args.storage, args.study, workers, args.device, not args.no_plots)
        # the live display is for a person at a terminal; else (and with --json) the log lines alone
        live = not args.json and sys.stdout.isatty() and sys.stderr.isatty()
        cfg = dataclasses.replace(cfg, log=tuple(args.log), progress=live)
        try:
            summary = run_search(search, cfg)
        except KeyboardInterrupt:
            print(
                f"interrupted; finished trials are kept in {run_dir}; rerun the same command to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        if args.json:
            print_json(summary.to_dict())
        else:
            from moeforge.search import report

            _, records = report(run_dir, None, None, plots=False)
            render(records, search, wide=args.wide)
            files = "best.yaml, trials.json, trials.csv" + ("" if args.no_plots else ", plots/")
            print(f"results: {run_dir}/ ({files})")
        return _exit_status(summary)
    except SearchStop as e:
        print(f"moeforge search: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (FileNotFoundError, ValueError) as e:
        print(f"moeforge search: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _positive_int(text: str) -> int:
    try:
        return max(0, int(text))
    except ValueError:
        return 0


def _exit_status(summary: SearchResult) -> int:
    """0 when the search ran (failed trials are results too), 1 when no trial completed."""
    from moeforge.cli import EXIT_FAIL

    failed, complete = summary.failed, summary.complete
    if failed:
        print(
            f"{failed} trial(s) failed: see fail_reason in trials.json and the tracebacks in the trial folders",
            file=sys.stderr,
        )
    if summary.worker_errors:
        print(f"worker exit statuses {summary.worker_errors}", file=sys.stderr)
    if not complete:
        print("no trial completed", file=sys.stderr)
        return EXIT_FAIL
    return 0


def _worker(args: argparse.Namespace) -> int:
    from moeforge.search import RunConfig, run_one_worker

    run_dir = Path(args.out)
    cfg = RunConfig(run_dir, args.storage, args.study, 1, args.device, log=tuple(args.log))
    try:
        run_one_worker(run_dir, args.storage, args.study, args.worker, cfg)
    except KeyboardInterrupt:
        return 130
    return 0


def _report(args: argparse.Namespace) -> int:
    from moeforge.search import report

    run_dir = Path(args.run_dir_arg) if args.run_dir_arg else (Path(args.out) if args.out else None)
    if run_dir is not None and args.storage is None:
        _check_run_info(run_dir)
    search, records = report(
        run_dir, args.storage, args.study, plots=not args.no_plots and run_dir is not None
    )
    if args.json:
        print_json({"trials": [r.to_dict() for r in records]})
    else:
        render(records, search, wide=args.wide)
    return 0


def _check_run_info(run_dir: Path) -> None:
    """A run dir's run.json names its storage and study; anything else is one line (ValueError), before
    the report reads it."""
    import json

    path = run_dir / "run.json"
    if not path.is_file():
        return  # the report says the run dir is not a search's
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not (isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("storage", "study"))):
        raise ValueError(
            f"{path}: not a search's run.json (an object with the strings storage and study); "
            "give --storage URL --study NAME"
        )


def render(records: list[TrialRecord], search: Any, wide: bool = False, con: Any = None) -> None:
    """Print the leaderboard, best first, within the console's width (80 when not a terminal).

    To fit, dotted parameter names shrink to their last components (a legend follows), then the columns
    in `_DROP_FIRST` go, then trailing parameters; a line under the table names what is hidden. `wide`
    shows every column under its full name, however wide.
    """
    from rich import box
    from rich.cells import cell_len
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    from moeforge._format import count
    from moeforge.search import TIE_RULE, leaderboard, noise_marks

    con = con or console()
    names = list(dict.fromkeys(k for r in records for k in r.params))
    params = {f"param:{n}": n for n in names}  # column id -> name; no spec key can clash with "params"
    stats = ["experts", "params", "activated", "tokens"]
    several = len(search.seeds) > 1
    every = ["#", "state", "value", *(["± seeds", "vs best"] if several else []), *params, *stats]
    full = {"#": "#", "state": "state", "value": search.objective.metric, "± seeds": "± seeds"}
    full["vs best"] = "vs best"
    marks = noise_marks(records)
    full |= params | {c: c for c in stats}
    short = full | {f"param:{n}": s for n, s in _short_names(names).items()}
    rows: list[dict[str, str]] = []
    notes = []  # free text goes under the table, so the numbers keep their width
    for r in leaderboard(records):
        if r.state == "WAITING":
            continue
        note = r.infeasible or r.fail_reason or r.died or ""
        if r.reused_from is not None:
            note = f"same spec as #{r.reused_from}"
        if note:
            notes.append(f"#{r.number}: {note}")
        state = "infeasible" if r.infeasible else _STATES.get(r.state, r.state.lower())
        experts = "-"
        if r.routed_experts is not None:
            experts = f"{r.shared_experts}+{r.top_k}/{r.routed_experts}"
        rows.append(
            {
                "#": str(r.number) + ("*" if note else ""),
                "state": state,
                "value": f"{r.value:.4f}" if r.value is not None else "-",
                "± seeds": f"{r.value_std:.4f}" if r.value_std is not None else "-",
                "vs best": marks.get(r.number, ""),
                **{p: _cell(r.params.get(n, "")) for p, n in params.items()},
                "experts": experts,
                "params": count(r.params_total) if r.params_total else "-",
                "activated": count(r.params_activated) if r.params_activated else "-",
                "tokens": count(r.tokens) if r.tokens else "-",
            }
        )

    def table(cols: list[str], heads: dict[str, str], rows: list[dict[str, str]]) -> Table:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        for c in cols:
            t.add_column(heads[c], justify="right", no_wrap=True)
        for row in rows:
            t.add_row(*(row[c] for c in cols))
        return t

    def width(t: Table) -> int:
        return Measurement.get(con, con.options.update_width(1 << 16), t).maximum

    # Fitting measures one row of each column's widest cell, not the whole leaderboard.
    widest = [{c: max((row[c] for row in rows), key=cell_len, default="") for c in every}]
    cols, heads = list(every), full
    if not wide:
        if width(table(cols, heads, widest)) > con.width:
            heads = short
        # The columns of least value go first; parameters only when nothing else is left, last first.
        for c in (*_DROP_FIRST, *reversed(list(params))):
            if width(table(cols, heads, widest)) <= con.width:
                break
            if c in cols:
                cols.remove(c)
    t = table(cols, heads, rows)
    if wide:
        t.width = width(t)  # else rich squeezes it into the console

    def say(line: str, indent: int = 0) -> None:  # free text: wrapped to the console unless wide
        if wide:
            con.print(Text(" " * indent + line), soft_wrap=True)
            return
        for part in Text(line).wrap(con, max(con.width - indent, 20)):
            part.rstrip()
            con.print(Text(" " * indent) + part)

    ladder = " (a ladder: each budget ranked on its own)" if search.budget.ladder else ""
    say(f"search {search.name}: {search.budget.label()} training FLOPs per trial{ladder}")
    con.print(t, crop=not wide)
    if several:
        say(f"value: mean over {len(search.seeds)} seeds; {TIE_RULE}", 2)
    else:
        say("value: 1 seed: no noise estimate (give seeds: [0, 1, ...] to tell real gaps from noise)", 2)
    legend = [f"{heads[c]}={full[c]}" for c in cols if heads[c] != full[c]]
    if legend:
        say("columns: " + ", ".join(legend), 2)
    hidden = [full[c] for c in every if c not in cols]
    if hidden:
        say(f"hidden to fit {con.width} columns: {', '.join(hidden)} (--wide shows all)", 2)
    for line in notes:
        say(line, 2)
    from moeforge.search import ladder_compute_line  # branched cooldowns: the compute saved

    saved = ladder_compute_line(records)
    if saved:
        say(saved, 2)


_STATES = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
_DROP_FIRST = ("tokens", "activated", "params", "experts", "± seeds")
"""The leaderboard's columns of least value, in the order they go when it is too wide ("vs best", the
seed-noise verdict, stays: a ranking without it over-claims)."""


def _short_names(names: list[str]) -> dict[str, str]:
    """Each name's shortest dotted suffix no other name ends with: moe.balance.expert_alpha -> expert_alpha."""
    out = {}
    for n in names:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            if sum(o == s or o.endswith("." + s) for o in names) == 1:
                break
        out[n] = s
    return out


def _cell(v: Any) -> str:
    """A parameter's value, short: floats to 4 significant digits (0.0003, 1.5e-05, 3.142)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
