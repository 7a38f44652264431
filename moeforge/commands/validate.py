"""moeforge validate SPEC...: check specs, print every located problem, exit 2 if any."""

from __future__ import annotations

import argparse
import sys

from ._common import SPEC_HELP, add_overrides, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check model specs and print every problem as file:line:col: key: message",
        description="Check model specs. Every problem of every file is printed as "
        "`file:line:col: dotted.key: message`; the exit status is 2 if any spec has a problem.",
    )
    p.add_argument("specs", nargs="+", metavar="SPEC", help=SPEC_HELP)
    add_overrides(p)
    p.add_argument("--json", action="store_true", help="print {spec: {ok, problems}} as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.compiler import SpecError, load_spec

    results = {}
    for path in args.specs:
        try:
            spec = load_spec(path, args.overrides)
            results[path] = {"ok": True, "name": spec.name, "problems": []}
        except SpecError as e:
            results[path] = {"ok": False, "problems": [str(p) for p in e.problems]}
    if args.json:
        print_json(results)
    else:
        for path, r in results.items():
            if r["ok"]:
                print(f"{path}: ok ({r['name']})")
            for line in r["problems"]:
                print(line, file=sys.stderr)
    return 0 if all(r["ok"] for r in results.values()) else 2
