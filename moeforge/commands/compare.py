"""moeforge compare A B ...: specs side by side."""

from __future__ import annotations

import argparse

from ._common import SPEC_HELP, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="several specs side by side",
        description="Parameters, FLOPs, memory and MoE shape of several specs side by side.",
        epilog="example:\n  moeforge compare gshard-2b ladder-shared-2b ladder-m2-2b ladder-m4-2b",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("specs", nargs="+", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--json", action="store_true", help="a list of reports, as `report --json` gives")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16", "fp8"))
    p.add_argument("--causal", action="store_true", help="halve attention-score FLOPs for the causal mask")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from moeforge._format import count, nbytes
    from moeforge.compiler import load_spec, report_dict

    reps = [report_dict(load_spec(s), dtype=args.dtype, causal=args.causal) for s in args.specs]
    if args.json:
        print_json(reps)
        return 0
    t = Table(title="compare", title_justify="left")
    t.add_column("")
    for r in reps:
        t.add_column(r["name"], justify="right")

    def moe(r, key):
        return str(r["derived"][key]) if r["derived"] and r["derived"][key] is not None else "-"

    rows = [
        ("parameters", lambda r: count(r["params"]["total"])),
        ("activated", lambda r: count(r["params"]["activated"])),
        ("non-embedding", lambda r: count(r["params"]["non_embedding"])),
        ("activated non-emb.", lambda r: count(r["params"]["activated_non_embedding"])),
        ("fwd FLOPs / token", lambda r: count(r["flops"]["forward_per_token"])),
        ("train FLOPs / seq", lambda r: count(r["flops"]["train_per_sequence"])),
        ("seq_len", lambda r: str(r["flops"]["seq_len"])),
        ("6N / token", lambda r: count(r["flops"]["six_n_per_token"])),
        ("routed experts", lambda r: moe(r, "routed_experts")),
        ("shared experts", lambda r: moe(r, "shared_experts")),
        ("routed top-k", lambda r: moe(r, "top_k")),
        ("expert width", lambda r: moe(r, "expert_hidden")),
        ("m", lambda r: moe(r, "m")),
        (f"weights ({args.dtype})", lambda r: nbytes(r["memory"]["weights_bytes"])),
    ]
    for label, fn in rows:
        t.add_row(label, *(fn(r) for r in reps))
    console().print(t)
    return 0
