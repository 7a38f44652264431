"""Test doubles for the search, kept out of the product.

`fake_evaluator` stands in for training: a smooth loss of the spec's shape, `seconds` long, lower for
larger m and one shared expert, so searches have something to find. Run as a script, this file is a
search worker that uses it (what a second machine would run, minus the training):

    python tests/search/fakes.py SPEC --out DIR [--storage URL] [--study NAME] [--seconds S]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moeforge.compiler import ModelSpec, account
from moeforge.runtime import RunSummary

SCRIPT = Path(__file__).resolve()


def fake_evaluator(seconds: float = 0.0, eval_points: int = 4) -> Callable:
    def evaluate(
        spec: ModelSpec, seed: int, budget: float, out_dir: Path, on_eval: Callable[[float, dict], None]
    ) -> dict:
        d = spec.moe_derived
        m, ks = (d.m or 1, d.shared_experts) if d else (1, 0)
        final = 2.0 + 0.3 / math.sqrt(m) + 0.05 * abs(ks - 1) + 0.1 / spec.n_layers + 0.001 * seed
        tokens = int(budget // account(spec).train_flops_per_token)
        for k in range(1, eval_points + 1):
            time.sleep(seconds / eval_points)
            on_eval(k / eval_points, {"val_loss": final + (eval_points - k) * 0.5})
        return fake_summary(
            initial_val_loss=5.5,
            final_val_loss=final,
            val_bits_per_byte=final / math.log(2),
            tokens=tokens,
            train_flops=tokens * account(spec).train_flops_per_token,
            budget_flops=budget,
            tokens_per_second=tokens / max(seconds, 1e-9),
        )

    return evaluate


def fake_summary(**fields) -> RunSummary:
    """A trainer's summary with `fields` set and the rest placeholders (what no fake trial reads)."""
    base = dict(
        status="completed",
        stopped_by="budget",
        initial_val_loss=None,
        final_val_loss=None,
        val_bits_per_byte=None,
        tokens=0,
        train_flops=0,
        budget_flops=None,
        planned_tokens=None,
        train_flops_per_token=0,
        tokens_per_second=None,
        flops_per_second=None,
        steps=0,
        wall_s=0.0,
        train_s=0.0,
        device="cpu",
        seq_len=0,
        params=0,
        corpus="fake",
        segments=[],
        load={},
        config={},
    )
    return RunSummary(**{**base, **fields})


def command(
    spec: Path, out: Path, seconds: float, storage: str | None = None, study: str | None = None
) -> list:
    cmd = [sys.executable, str(SCRIPT), str(spec), "--out", str(out), "--seconds", str(seconds)]
    cmd += ["--storage", storage] if storage else []
    cmd += ["--study", study] if study else []
    return cmd


def main() -> int:
    from moeforge.search import RunConfig, SearchStop, load_search, run_search

    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--out", required=True)
    ap.add_argument("--storage")
    ap.add_argument("--study")
    ap.add_argument("--seconds", type=float, default=0.0)
    args = ap.parse_args()
    search = load_search(args.spec)
    cfg = RunConfig(Path(args.out), args.storage, args.study, plots=False)
    try:
        out = run_search(search, cfg, evaluate=fake_evaluator(args.seconds, search.train.eval_points))
    except SearchStop as e:
        print(f"fake worker: {e}", file=sys.stderr)
        return 1
    return 0 if out.complete else 1


if __name__ == "__main__":
    sys.exit(main())
