"""Pieces several commands share."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SPEC_HELP = "a model spec: a YAML path or a shipped name (see `moeforge report --list`)"


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, validated like the file (repeatable), e.g. --set moe.top_k=4",
    )


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def console():
    from rich.console import Console

    return Console()
