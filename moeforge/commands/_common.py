"""Pieces several commands share."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
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


# Spec fields that only shape training (initialization, auxiliary losses, bias updates) or only name the
# model: a checkpoint evaluates the same whatever they are.
_TRAINING_ONLY = ("name", "init_std", "moe.balance.", "moe.gate.bias_update_speed")


def trained_spec_mismatch(spec: Any, checkpoint: str | Path) -> str | None:
    """Why `checkpoint` is not a checkpoint of `spec`, when its run dir records the spec it was trained
    with (spec.yaml in the checkpoint's folder or up to two above); None when they agree or nothing is
    recorded. Shapes can match while the model differs (another moe.top_k routes the same weights
    differently), so the recorded spec is compared field by field."""
    from moeforge.compiler import SpecError, load_spec

    path = Path(checkpoint)
    run_dir = next((d for d in (path, path.parent, path.parent.parent) if (d / "spec.yaml").is_file()), None)
    if run_dir is None:
        return None
    try:
        trained = load_spec(run_dir / "spec.yaml")
    except SpecError:
        return None
    was, now = _flat(trained.model_dump()), _flat(spec.model_dump())
    diff = [
        k
        for k in sorted(was.keys() | now.keys())
        if was.get(k) != now.get(k) and not any(k == t or k.startswith(t) for t in _TRAINING_ONLY if t)
    ]
    if not diff:
        return None
    shown = ", ".join(f"{k} {was.get(k)!r} there, {now.get(k)!r} here" for k in diff[:3])
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return (
        f"--checkpoint: {run_dir} was trained with another spec ({shown}{more}); "
        f"use the spec it records: {run_dir / 'spec.yaml'}"
    )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
