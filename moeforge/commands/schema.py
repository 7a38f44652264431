"""moeforge schema: the JSON Schema of model (or search) specs."""

from __future__ import annotations

import argparse

from ._common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of specs (for editors and tools)",
        description="Print the JSON Schema of model specs (or search specs with --search). Shipped specs "
        "start with `# yaml-language-server: $schema=...` so editors with the YAML language server "
        "complete and check keys as you type.",
    )
    p.add_argument("--search", action="store_true", help="the schema of search specs instead")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.search:
        from moeforge.search import search_schema

        print_json(search_schema())
    else:
        from moeforge.compiler import model_schema

        print_json(model_schema())
    return 0
