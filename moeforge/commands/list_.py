"""moeforge list: the shipped model and search specs, one line each with what they are."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from ._common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="the shipped model and search specs, one line each (name them without a path)",
        description="List the specs that ship with moeforge: each model with its parameters (total and "
        "activated per token, from the same accounting as `moeforge report`), its layout and its "
        "description; each search with its budget, trials, axes and base model.",
        epilog="examples:\n  moeforge list\n  moeforge list searches\n"
        "  moeforge list --json | jq '.models[] | select(.activated < 1e9) | .name'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "kind", nargs="?", choices=("models", "searches"), help="only models or only searches (default both)"
    )
    p.add_argument("--json", action="store_true", help="{models: [...], searches: [...]} with exact integers")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.compiler import shipped_dir

    out: dict[str, list[dict[str, Any]]] = {}
    if args.kind in (None, "models"):
        out["models"] = [
            model_entry(p) for p in sorted(shipped_dir("models").glob("*.yaml"), key=lambda p: p.stem)
        ]
    if args.kind in (None, "searches"):
        out["searches"] = [
            search_entry(p) for p in sorted(shipped_dir("searches").glob("*.yaml"), key=lambda p: p.stem)
        ]
    if args.json:
        print_json(out)
        return 0
    render(out)
    return 0


_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.\s+(?=[A-Z(])")


def description(path: Path) -> str:
    """The first sentence of the comment that opens a spec file (after the schema line), up to its first
    blank or indented (example command) comment line."""
    lines = []
    for raw in path.read_text().splitlines():
        if not raw.startswith("#"):
            break
        text = raw[1:]
        if text.strip().startswith("yaml-language-server:"):
            continue
        if not text.strip() or text.startswith("   "):
            break
        lines.append(text.strip())
    text = " ".join(lines)
    m = _SENTENCE_END.search(text)
    return text if m is None else text[: m.start() + 1]


def model_entry(path: Path) -> dict[str, Any]:
    """What a shipped model spec is: counts, layout, description (or the first problem, if it is broken)."""
    from moeforge.compiler import SpecError, account, load_spec

    entry: dict[str, Any] = {"name": path.stem, "path": str(path), "description": description(path)}
    try:
        spec = load_spec(path)
    except SpecError as e:
        return entry | {"problem": str(e).splitlines()[0]}
    acc = account(spec)
    moe = spec.moe_derived  # whichever form the spec uses (paper form: experts, m, shared)
    layout = f"{spec.n_layers} layers, d_model {spec.d_model}, {spec.attention.kind}"
    if moe is None:
        layout = f"dense, {layout}"
    else:
        shared = f"{moe.shared_experts} shared + " if moe.shared_experts else ""
        layout = f"MoE {shared}top-{moe.top_k} of {moe.routed_experts} routed, {layout}"
    return entry | {"params": acc.params_total, "activated": acc.params_activated, "layout": layout}


def search_entry(path: Path) -> dict[str, Any]:
    """What a shipped search spec is: budget, trials, axes, seeds, description."""
    from moeforge.compiler import SpecError
    from moeforge.search import load_search

    entry: dict[str, Any] = {"name": path.stem, "path": str(path), "description": description(path)}
    try:
        s = load_search(path)
    except SpecError as e:
        return entry | {"problem": str(e).splitlines()[0]}
    return entry | {
        "budget_flops": list(s.budget.budgets),
        "n_trials": s.n_trials,
        "axes": list(s.space.names),
        "seeds": len(s.seeds),
    }


def render(out: dict[str, list[dict[str, Any]]]) -> None:
    from moeforge._format import count

    def table(rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        return [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
        ]

    lines: list[str] = []
    if "models" in out:
        lines.append("models (`moeforge report NAME` counts one, `moeforge train NAME` trains it):")
        rows = [
            [m["name"], "invalid", "", f"{m['problem']}"]
            if "problem" in m
            else [
                m["name"],
                f"{count(m['params'])} params",
                f"{count(m['activated'])} activated",
                f"{m['layout']}. {m['description']}",
            ]
            for m in out["models"]
        ]
        lines += table(rows) if rows else ["  (none)"]
    if "searches" in out:
        if lines:
            lines.append("")
        lines.append("searches (`moeforge search NAME` runs one):")
        rows = [
            [s["name"], "invalid", f"{s['problem']}"]
            if "problem" in s
            else [
                s["name"],
                f"{', '.join(f'{c:.3g}' for c in s['budget_flops'])} FLOPs/trial, {s['n_trials']} trials"
                + (f" x {s['seeds']} seeds" if s["seeds"] > 1 else ""),
                f"axes {', '.join(s['axes'])}. {s['description']}",
            ]
            for s in out["searches"]
        ]
        lines += table(rows) if rows else ["  (none)"]
    sys.stdout.write("\n".join(ln for ln in lines if ln is not None) + "\n")
