"""moeforge report SPEC: parameters, FLOPs and memory, by component or by layer."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import _types as T
from ._common import SPEC_HELP, add_overrides, console, print_json

DTYPES = ("fp32", "bf16", "fp16", "fp8")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="parameters, FLOPs and memory of a spec (table, or --json for tools)",
        description="Count a spec exactly: total and activated parameters, forward and training FLOPs per "
        "token and per sequence (2 FLOPs per multiply-add, attention over the full sequence unless "
        "--causal, training = 3 x forward), memory at a dtype, and the derived MoE numbers. "
        "--measure builds the model and checks the counts against torch's FlopCounterMode and fvcore.",
        epilog="examples:\n  moeforge report deepseekmoe-16b\n  moeforge report debug --by layer --measure\n"
        "  moeforge report my.yaml --set moe.top_k=4 --json | jq .params.activated",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", metavar="SPEC", help=SPEC_HELP)
    add_overrides(p)
    p.add_argument("--json", action="store_true", help="machine-readable report with exact integers")
    p.add_argument(
        "--by", choices=("component", "layer"), default="component", help="table rows (default component)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype for memory figures (default bf16)")
    p.add_argument(
        "--causal", action="store_true", help="halve attention-score FLOPs for the causal mask (Megatron)"
    )
    p.add_argument("--measure", action="store_true", help="build the model and measure FLOPs and parameters")
    p.add_argument("--list", action="store_true", help="list the shipped specs and exit")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="also say the data's training tokens per parameter: `bundled`, a folder of `moeforge data "
        "prepare`, text or .bin token files",
    )
    p.add_argument(
        "--budget-flops",
        type=T.positive_float,
        metavar="C",
        help="with --data: how many tokens and epochs this training budget makes (and whether it repeats data)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.compiler import load_spec, report_dict, shipped_names

    if args.list or not args.spec:
        if not args.list:
            print("moeforge report: give a SPEC (a YAML path or one of the shipped names below)\n")
        print("\n".join(shipped_names()))
        return 0 if args.list else 2
    spec = load_spec(args.spec, args.overrides)
    rep = report_dict(spec, dtype=args.dtype, causal=args.causal)
    if args.measure:
        from moeforge.compiler import measure

        try:
            rep["measured"] = measure(spec)
        except ValueError as e:  # too big to build here: one line, no traceback
            print(f"moeforge report --measure: {e}", file=sys.stderr)
            return 1
    line = None
    if args.data is not None:  # loading data imports torch; only when asked
        from moeforge.runtime import DataError, load_corpus

        from .train import data_line

        try:
            corpus = load_corpus(None if args.data == "bundled" else args.data)
        except DataError as e:
            print(f"moeforge report --data: {e}", file=sys.stderr)
            return 2
        acc = rep["params"]["total"]
        planned = int(args.budget_flops // rep["flops"]["train_per_token"]) if args.budget_flops else None
        line = data_line(corpus, acc, planned)
        too_small = _too_small(args.budget_flops, spec.seq_len, rep["flops"]["train_per_token"])
        if too_small:  # the words `moeforge train` would refuse it with
            line += f"\nbudget too small to train (at the default batch): --budget-flops {too_small}"
        rep["data"] = {
            "name": corpus.name,
            "train_tokens": len(corpus.train),
            "tokens_per_param": len(corpus.train) / acc,
            "budget_tokens": planned,
            "epochs": planned / len(corpus.train) if planned is not None else None,
            "budget_too_small": too_small,
        }
    if args.json:
        print_json(rep)
    else:
        render(rep, by=args.by)
        if line:
            print(line)
    return 0


def _too_small(budget_flops: float | None, seq_len: int, train_flops_per_token: int) -> str | None:
    """Why `moeforge train` (at its default batch) would refuse this budget (runtime MIN_STEPS), or None."""
    from moeforge.runtime import TrainConfig, budget_problem

    if budget_flops is None:
        return None
    try:
        return budget_problem(TrainConfig(budget_flops=budget_flops), seq_len, train_flops_per_token)
    except ValueError:  # a budget TrainConfig refuses (nan, negative) is the flag check's to report
        return None


def render(rep: dict[str, Any], by: str = "component") -> None:
    from rich.table import Table

    from moeforge._format import count, nbytes, pct

    con = console()
    P, Fl = rep["params"], rep["flops"]
    title = f"[bold]{rep['name']}[/]"
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column(justify="right", style="bold")
    summary.add_column(style="dim")
    summary.add_row("parameters", count(P["total"]), f"{P['total']:,}")
    summary.add_row(
        "activated / token", count(P["activated"]), f"{P['activated']:,} ({pct(P['activated'], P['total'])})"
    )
    summary.add_row(
        "non-embedding", count(P["non_embedding"]), f"activated {count(P['activated_non_embedding'])}"
    )
    attn = "causal (halved)" if Fl["causal"] else "full square"
    summary.add_row(
        "forward FLOPs / token",
        count(Fl["forward_per_token"]),
        f"at seq_len {Fl['seq_len']}, attention {attn}",
    )
    summary.add_row("training FLOPs / token", count(Fl["train_per_token"]), "3 x forward")
    summary.add_row("training FLOPs / sequence", count(Fl["train_per_sequence"]), f"x {Fl['seq_len']} tokens")
    summary.add_row("6N / token", count(Fl["six_n_per_token"]), "6 x activated non-embedding params")
    M = rep["memory"]
    summary.add_row(
        f"weights ({M['dtype']})",
        nbytes(M["weights_bytes"]),
        f"training state {nbytes(M['train_state_bytes'])} (AdamW)",
    )
    summary.add_row(
        "activations / token", nbytes(M["activation_bytes_per_token"]), "estimate, flash attention"
    )
    d = rep["derived"]
    if d:
        m = f", m={d['m']}" if d["m"] else ""
        moe_line = (
            f"{d['shared_experts']} shared + top-{d['top_k']} of {d['routed_experts']} routed, "
            f"expert width {d['expert_hidden']}{m}"
        )
        summary.add_row("MoE layers", str(len(d["moe_layers"])), moe_line)
    meas = rep.get("measured")
    if meas:

        def vs(measured: float, analytic: float) -> str:
            return f", {100 * (measured - analytic) / analytic:+.2f}% vs analytic" if analytic else ""

        fwd, train = Fl["forward_per_token"], Fl["train_per_token"]
        # measured attention is the full square at the measured seq_len: compare only like with like
        if meas["seq_len"] != Fl["seq_len"] or Fl["causal"]:
            fwd = train = 0
        experts = f" (experts: {meas['dispatch']})" if meas.get("dispatch") else ""
        for label, key, how, analytic in (
            ("measured fwd FLOPs / token", "forward_flops_per_token", "FlopCounterMode", fwd),
            ("measured train FLOPs / token", "train_flops_per_token", "FlopCounterMode fwd+bwd", train),
            ("fvcore fwd FLOPs / token", "fvcore_forward_flops_per_token", "fvcore x 2", fwd),
        ):
            summary.add_row(label, count(meas[key]), f"{how}{vs(meas[key], analytic)}{experts}")
            experts = ""
        n = meas["params_total"]
        summary.add_row("measured parameters", count(n), f"{n:,} (numel){vs(n, P['total'])}")
    con.print(title)
    con.print(summary)

    if by == "component":
        t = Table(title="by component", title_justify="left")
        for col in ("component", "params", "% total", "activated", "fwd FLOPs/token", "% FLOPs"):
            t.add_column(col, justify="left" if col == "component" else "right")
        for c, v in P["by_component"].items():
            if v["total"] == 0 and Fl["by_component"][c] == 0:
                continue
            f = Fl["by_component"][c]
            t.add_row(
                c,
                count(v["total"]),
                pct(v["total"], P["total"]),
                count(v["activated"]),
                count(f),
                pct(f, Fl["forward_per_token"]),
            )
        t.add_row(
            "[bold]total",
            count(P["total"]),
            "100%",
            count(P["activated"]),
            count(Fl["forward_per_token"]),
            "100%",
        )
    else:
        t = Table(title="by layer", title_justify="left")
        for col in ("layer", "kind", "params", "activated", "fwd FLOPs/token"):
            t.add_column(col, justify="right")
        for lp, lf in zip(P["by_layer"], Fl["by_layer"], strict=True):
            t.add_row(
                str(lp["layer"]),
                lp["kind"],
                count(lp["total"]),
                count(lp["activated"]),
                count(lf["forward_per_token"]),
            )
    con.print(t)
