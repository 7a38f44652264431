"""`--log tensorboard|wandb|mlflow` of `train` and `search`: the flag, its check, and the run's `Tracking`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moeforge.runtime import TRACKERS, Tracking, check_trackers


def add_log_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log",
        action="append",
        default=[],
        choices=TRACKERS,
        metavar="TRACKER",
        help="also send the curves (loss, lr, tokens/s, expert load and drops, grad norm, eval loss) to "
        "tensorboard, wandb or mlflow (repeatable; each is an extra: pip install 'moeforge[tensorboard]')",
    )


def check_log_flag(command: str, kinds: list[str]) -> bool:
    """Print one line and return True when a tracker asked for cannot be used (its library is missing)."""
    try:
        check_trackers(kinds)
    except ValueError as e:
        print(f"moeforge {command}: {e}", file=sys.stderr)
        return True
    return False


def run_tracking(
    kinds: list[str], root: Path, group: str, name: str, params: dict[str, Any]
) -> Tracking | None:
    """The run's `Tracking`, or None without --log."""
    if not kinds:
        return None
    return Tracking(
        tuple(dict.fromkeys(kinds)), root, group, name, {k: v for k, v in params.items() if v is not None}
    )
