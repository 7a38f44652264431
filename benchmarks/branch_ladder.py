"""A budget-ladder search with branched cooldowns against the same search with separate WSD runs.

    python -m benchmarks.branch_ladder --out runs/branch-ladder      # JSON on stdout and in OUT/result.json

The debug model (paper-form MoE, m=2), a 4x ladder of three budgets, seeds 0 and 1, one CPU thread. Per
budget: the seed-mean loss of each search, their difference, and the seed noise (the larger of the two
searches' seed standard deviations); and the tokens each search trained (`search.ladder_compute`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from moeforge.search import RunConfig, ladder_compute, load_search, run_search, trial_records

BUDGETS = (5e9, 1e10, 2e10)  # about 25, 50 and 100 steps of 2 x 128 tokens
SPEC = """\
name: {name}
base:
  base: debug
  moe: {{paper: {{experts: 4, top_k: 1, m: 1, shared: 0}}}}
space:
  granularity: [2]
budget: {{train_flops: [{budgets}]}}
sampler: {{kind: grid, seed: 0}}
n_trials: 10
seeds: [0, 1]
train:
  device: cpu
  batch_size: 2
  cpu_threads: 1
  eval_points: 1
  branch_cooldowns: {branch}
  options: {{eval_tokens: 8192, schedule: wsd, warmup_tokens: 1024, cooldown: 0.2}}
"""


def _search(out: Path, branch: bool) -> tuple[dict[float, list[float]], int, float]:
    name = "branched" if branch else "separate"
    path = out / f"{name}.yaml"
    path.write_text(
        SPEC.format(name=name, budgets=", ".join(repr(c) for c in BUDGETS), branch=str(branch).lower())
    )
    search = load_search(path)
    t0 = time.perf_counter()
    run_search(search, RunConfig(out / name, plots=False), log=lambda _: None)
    wall = time.perf_counter() - t0
    import optuna
    from moeforge.search import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(str(out / name / "study.journal")))
    records = [r for r in trial_records(study) if r.state == "COMPLETE" and r.reused_from is None]
    values = {r.params["budget"]: r.seed_values for r in records}
    compute = ladder_compute(records)
    trained = compute[0] if compute else sum((r.tokens or 0) * len(r.seeds or [0]) for r in records)
    return values, trained, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/branch-ladder"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    branched, tokens_b, wall_b = _search(args.out, True)
    separate, tokens_s, wall_s = _search(args.out, False)
    rows = []
    for c in BUDGETS:
        b, s = branched[c], separate[c]
        rows.append(
            {
                "budget_flops": c,
                "branched": statistics.fmean(b),
                "separate": statistics.fmean(s),
                "difference": statistics.fmean(b) - statistics.fmean(s),
                "max_abs_seed_difference": max(abs(x - y) for x, y in zip(b, s, strict=True)),
                "seed_std": max(statistics.stdev(b), statistics.stdev(s)),
            }
        )
    result = {
        "budgets": rows,
        "tokens": {"branched": tokens_b, "separate": tokens_s, "saved": 1 - tokens_b / tokens_s},
        "wall_s": {"branched": round(wall_b, 1), "separate": round(wall_s, 1)},
        "torch": torch.__version__,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
