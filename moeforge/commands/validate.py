"""moeforge validate SPEC...: check model and search specs, print every located problem, exit 2 if any."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_overrides, print_json

# Top-level keys that only search specs have (SearchSpec's fields that are not ModelSpec's; a test keeps
# this in step). Written out so that validating a model spec never imports the search package.
SEARCH_KEYS = frozenset(
    {
        "space",
        "budget",
        "n_trials",
        "constraints",
        "objective",
        "sampler",
        "pruner",
        "timeout_s",
        "seeds",
        "train",
    }
)

DESCRIPTION = """\
Check model specs and search specs. Every problem of every file is printed as
`file:line:col: dotted.key: message`; the exit status is 2 if any spec has a problem.

A file is checked as a search spec when it lies in a folder named `searches` or its top level has a key
only search specs have (space, budget, n_trials, constraints, objective, sampler, pruner, seeds, train,
timeout_s); anything else is checked as a model spec. A bare name is a shipped model spec, else a
shipped search spec (`moeforge validate quickstart`). A search spec is checked exactly as
`moeforge search` reads it, its base model spec included."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check model and search specs; print every problem as file:line:col: key: message",
        description=DESCRIPTION,
        epilog="examples:\n  moeforge validate specs/models/*.yaml specs/searches/*.yaml\n"
        "  moeforge validate my-search.yaml --set n_trials=4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "specs",
        nargs="+",
        metavar="SPEC",
        help="a model or search spec: a YAML path or a shipped name (see `moeforge report --list`)",
    )
    add_overrides(p)
    p.add_argument("--json", action="store_true", help="print {spec: {ok, kind, name, problems}} as JSON")
    p.set_defaults(run=run)


def is_search_spec(path_or_name: str | Path) -> bool:
    """Whether `path_or_name` names a search spec (the rule in DESCRIPTION); unreadable files are not."""
    from moeforge.compiler import SpecError, read_yaml, resolve

    try:
        path = resolve(path_or_name, "models")
    except SpecError:
        try:
            resolve(path_or_name, "searches")
        except SpecError:
            return False  # validated as a model spec, whose error says what is wrong
        return True
    if path.resolve().parent.name == "searches":
        return True
    try:
        data, _ = read_yaml(path)
    except SpecError:
        return False  # the model loader reports the same problem
    return isinstance(data, dict) and not SEARCH_KEYS.isdisjoint(data)


def run(args: argparse.Namespace) -> int:
    from moeforge.compiler import SpecError, load_spec

    results = {}
    for path in args.specs:
        kind = "search" if is_search_spec(path) else "model"
        try:
            if kind == "search":
                from moeforge.search import load_search

                name = load_search(path, args.overrides).name
            else:
                name = load_spec(path, args.overrides).name
            results[path] = {"ok": True, "kind": kind, "name": name, "problems": []}
        except SpecError as e:
            results[path] = {"ok": False, "kind": kind, "problems": [str(p) for p in e.problems]}
    if args.json:
        print_json(results)
    else:
        for path, r in results.items():
            if r["ok"]:
                print(f"{path}: ok ({'search ' if r['kind'] == 'search' else ''}{r['name']})")
            for line in r["problems"]:
                print(line, file=sys.stderr)
    return 0 if all(r["ok"] for r in results.values()) else 2
