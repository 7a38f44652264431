"""Learning-rate sweeps for `train.hparams: small` (issue 16, item 2): fit lr = a N^-b, then check it.

    python -m benchmarks.lr_sweep sweep --out runs/lr_sweep   # 5-point sweeps at several sizes, fit a, b
    python -m benchmarks.lr_sweep check --out runs/lr_sweep   # 5-point sweeps centred on the rule's lr
    python -m benchmarks.lr_sweep estimate                    # the study's wall time from measured tokens/s

Every run is a model of the shipped study (`specs/searches/scaling.yaml`, or --search) at its smallest
budget, trained as the study trains it (`hparams: small`'s batch and warmup, its train.options: WSD, eval
tokens) with only the lr changed; one CPU thread per run, --procs runs at a time. Results are appended to
OUT/results.jsonl as they come (a run already there is not trained again) and the table is printed from it;
OUT/<what>.json holds the table and the fit.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from pathlib import Path

SIZES = (0.03125, 0.125, 0.5)  # sweep: 16x apart in N at the ends
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # sweep: lr points around a guess
CHECK = (0.5, 0.7071, 1.0, 1.4142, 2.0)  # check: lr points around the rule's
CHECK_SIZES = (0.03125, 0.5)


def _guess(n: int) -> float:
    """Where the sweep centres: the fit of a first sweep (seq_len 64, 2e10 FLOPs)."""
    return 33.8 * n**-0.925


def _unit(search_name: str, size: float, m: int, budget: float | None = None) -> tuple:
    from moeforge.compiler import account
    from moeforge.search import load_search, rule_for, trial_to_spec

    search = load_search(search_name)
    budget = budget or min(search.budget.budgets)
    params = {"m": m, "size": size, "budget": budget}
    if search.space.shared:
        params["K_s"] = 0
    spec = trial_to_spec(search, params)
    return search, spec, budget, rule_for(search, spec, budget), account(spec)


def _train(job: dict) -> dict:
    import torch
    from moeforge.compiler import build
    from moeforge.runtime import load_corpus, train
    from moeforge.search import train_config

    torch.set_num_threads(1)
    search, spec, budget, rule, acc = _unit(job["search"], job["size"], job["m"], job.get("budget"))
    cfg = train_config(
        search, budget_flops=budget, seed=job["seed"], device="cpu", rule={**rule, "lr": job["lr"]}
    )
    cfg = cfg.model_copy(update={"eval_points": 1, "checkpoint_every_s": 1e9})
    t0 = time.perf_counter()
    s = train(
        build(spec, seed=job["seed"]),
        seq_len=spec.seq_len,
        train_flops_per_token=acc.train_flops_per_token,
        corpus=load_corpus(vocab_size=spec.vocab_size),
        cfg=cfg,
        progress=False,
    )
    wall = time.perf_counter() - t0
    return {
        **job,
        "N": acc.params_activated_non_embedding,
        "budget": budget,
        "tokens": s["tokens"],
        "steps": s.get("steps"),
        "batch_size": cfg.batch_size,
        "warmup_tokens": cfg.warmup_tokens,
        "schedule": cfg.schedule,
        "loss": s["final_val_loss"],
        "wall_s": round(wall, 2),
        "tokens_per_s": round(s["tokens"] / wall, 1),
    }


def _speed(job: dict) -> dict:
    """Seconds per optimizer step of one candidate at one batch: wall and this process's CPU time (the
    wall time on an idle core), from a short run without evaluations."""
    import torch
    from moeforge.compiler import account, build
    from moeforge.runtime import TrainConfig, load_corpus, train
    from moeforge.search import load_search, trial_to_spec

    torch.set_num_threads(1)
    search = load_search(job["search"])
    spec = trial_to_spec(search, job["params"])
    kw = {
        "seq_len": spec.seq_len,
        "train_flops_per_token": account(spec).train_flops_per_token,
        "corpus": load_corpus(vocab_size=spec.vocab_size),
        "progress": False,
    }
    out = {}
    for steps in (5, 5 + job["steps"]):  # the difference leaves out start-up
        cfg = TrainConfig(
            device="cpu",
            steps=steps,
            batch_size=job["batch_size"],
            eval_points=0,
            eval_tokens=1,
            checkpoint_every_s=1e9,
        )
        w, c = time.perf_counter(), time.process_time()
        train(build(spec, seed=0), cfg=cfg, **kw)
        out[steps] = (time.perf_counter() - w, time.process_time() - c)
    (w0, c0), (w1, c1) = out[5], out[5 + job["steps"]]
    return {
        **job,
        "wall_per_step": (w1 - w0) / job["steps"],
        "cpu_per_step": (c1 - c0) / job["steps"],
        "start_s": w0,
    }


def estimate(search_name: str, procs: int, steps: int) -> dict:
    """Wall time of the search with `procs` workers: every (candidate, budget, seed) trained separately
    (no branched cooldowns), each step at the seconds per step its candidate measures here at its batch
    (CPU time: what an idle core gives; and wall time, under whatever else this machine runs), plus each
    training's start-up and two evaluations (EVAL_S)."""
    import itertools

    from moeforge.compiler import account
    from moeforge.search import Infeasible, grid_space, load_search, rule_for, trial_to_spec

    search = load_search(search_name)
    grid = grid_space(search)
    budgets = grid.pop("budget")
    units = []
    for point in itertools.product(*grid.values()):
        params = dict(zip(grid, point, strict=True))
        try:
            spec = trial_to_spec(search, params)
        except Infeasible:
            continue
        fpt = account(spec).train_flops_per_token
        for c in budgets:
            rule = rule_for(search, spec, c)
            tokens = int(c // fpt)
            units.append((params, c, rule["batch_size"], tokens / (rule["batch_size"] * spec.seq_len)))
    jobs = {
        (tuple(p.items()), b): {"search": search_name, "params": p, "batch_size": b, "steps": steps}
        for p, _, b, _ in units
    }
    with mp.get_context("spawn").Pool(procs) as pool:
        speed = dict(zip(jobs, pool.map(_speed, list(jobs.values())), strict=True))
    rows, cpu, wall = [], 0.0, 0.0
    n_seeds = len(search.seeds)
    for params, c, b, n_steps in units:
        sp = speed[(tuple(params.items()), b)]
        start = sp["start_s"] + EVAL_S
        rows.append(
            {
                **params,
                "budget": c,
                "batch_size": b,
                "steps": round(n_steps),
                "cpu_s": round(n_steps * sp["cpu_per_step"] + start, 1),
                "wall_s": round(n_steps * sp["wall_per_step"] + start, 1),
            }
        )
        cpu += n_seeds * rows[-1]["cpu_s"]
        wall += n_seeds * rows[-1]["wall_s"]
    for c in budgets:
        r = [x for x in rows if x["budget"] == c]
        print(
            f"budget {c:.3g}: {len(r) * n_seeds} trainings, {sum(x['steps'] for x in r) * n_seeds:,} steps, "
            f"{n_seeds * sum(x['cpu_s'] for x in r):.0f} CPU-s ({n_seeds * sum(x['wall_s'] for x in r):.0f} wall-s here)"
        )
    n = len(units) * n_seeds
    print(
        f"{n} trainings: {cpu:.0f} s of one idle core -> {cpu / procs / 60:.1f} min with --workers {procs} "
        f"({wall / procs / 60:.1f} min at this machine's present wall-clock speed)"
    )
    return {
        "rows": rows,
        "trainings": n,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "minutes_idle": cpu / procs / 60,
        "minutes_here": wall / procs / 60,
    }


EVAL_S = 1.0
"""Per training: two evaluations of 8192 tokens and the final checkpoint (tiny models: about a second)."""


def _key(r: dict) -> tuple:
    return (r["what"], r.get("budget"), r["size"], r["m"], round(r["lr"], 8), r["seed"])


def _run(jobs: list[dict], out: Path, procs: int) -> list[dict]:
    path = out / "results.jsonl"
    done = {_key(r): r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    todo = [j for j in jobs if _key(j) not in done]
    with mp.get_context("spawn").Pool(procs) as pool:
        for r in pool.imap_unordered(_train, todo):
            print(json.dumps(r), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(r) + "\n")
            done[_key(r)] = r
    return [done[_key(j)] for j in jobs]


def _table(rows: list[dict]) -> dict:
    """Per size: lr -> seed-mean loss, the best lr, and which points lie within 1% of the best."""
    out: dict = {}
    for r in rows:
        out.setdefault(
            r["size"],
            {
                "N": r["N"],
                "tokens": r["tokens"],
                "batch_size": r["batch_size"],
                "steps": r["steps"],
                "warmup_tokens": r["warmup_tokens"],
                "loss": {},
            },
        )
        out[r["size"]]["loss"].setdefault(r["lr"], []).append(r["loss"])
    for t in out.values():
        t["loss"] = {lr: sum(v) / len(v) for lr, v in sorted(t["loss"].items())}
        t["best_lr"], t["best"] = min(t["loss"].items(), key=lambda kv: kv[1])
        t["flat"] = [lr for lr, v in t["loss"].items() if v <= 1.01 * t["best"]]
    return out


def _fit(table: dict) -> tuple[float, float]:
    """Least squares of log(best lr) on log N, the best lr refined by a parabola in log lr through the
    best point and its neighbours (when it is interior)."""
    xs, ys = [], []
    for t in table.values():
        lrs, ls = list(t["loss"]), list(t["loss"].values())
        i = ls.index(min(ls))
        best = math.log(lrs[i])
        if 0 < i < len(lrs) - 1:
            x = [math.log(lrs[j]) for j in (i - 1, i, i + 1)]
            y = [ls[j] for j in (i - 1, i, i + 1)]
            den = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
            a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / den
            b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / den
            if a > 0:
                best = min(max(-b / (2 * a), x[0]), x[2])
        t["fit_lr"] = math.exp(best)
        xs.append(math.log(t["N"]))
        ys.append(best)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - slope * mx), -slope


def _print(table: dict) -> None:
    for size, t in table.items():
        pts = "  ".join(
            f"{lr:.4g}: {v:.4f}{'*' if lr == t['best_lr'] else ('~' if lr in t['flat'] else ' ')}"
            for lr, v in t["loss"].items()
        )
        print(
            f"size {size:<8} N {t['N']:>6}  tokens {t['tokens']:>8}  batch {t['batch_size']:>2}  "
            f"steps {t['steps']}  warmup {t['warmup_tokens']}  |  {pts}"
        )
    print("(* best; ~ within 1% of it)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("sweep", "check", "estimate"))
    p.add_argument("--steps", type=int, default=40, help="estimate: timed steps per (candidate, batch)")
    p.add_argument("--out", type=Path, default=Path("runs/lr_sweep"))
    p.add_argument("--search", default="scaling")
    p.add_argument("--sizes", type=float, nargs="+", default=None)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--budget", type=float, default=None, help="default the search's smallest")
    p.add_argument("--points", type=float, nargs="+", default=None, help="lr factors (check: of the rule's)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "estimate":
        est = estimate(a.search, a.procs, a.steps)
        (a.out / "estimate.json").write_text(json.dumps(est, indent=1))
        return
    jobs = []
    centres = {}
    for size in a.sizes or (SIZES if a.what == "sweep" else CHECK_SIZES):
        _, _, budget, rule, acc = _unit(a.search, size, a.m, a.budget)
        n = acc.params_activated_non_embedding
        centre, pts = (_guess(n), FACTORS) if a.what == "sweep" else (rule["lr"], CHECK)
        centres[size] = round(centre, 8)
        pts = a.points or pts
        for f in pts:
            for seed in a.seeds:
                jobs.append(
                    {
                        "what": a.what,
                        "search": a.search,
                        "size": size,
                        "m": a.m,
                        "lr": round(centre * f, 8),
                        "seed": seed,
                        "budget": budget,
                    }
                )
    rows = _run(jobs, a.out, a.procs)
    table = _table(rows)
    _print(table)
    res: dict = {
        "what": a.what,
        "search": a.search,
        "m": a.m,
        "seeds": a.seeds,
        "table": {str(k): v for k, v in table.items()},
    }
    if a.what == "sweep":
        lr_a, lr_b = _fit(table)
        res["fit"] = {"a": lr_a, "b": lr_b}
        print(
            f"fit: lr = {lr_a:.4g} * N^-{lr_b:.4f}  (per size: "
            + ", ".join(f"N {t['N']}: {t['fit_lr']:.4g}" for t in table.values())
            + ")"
        )
    else:
        res["rule_lr"], res["within_1pct"] = {}, {}
        for size, t in table.items():
            lr = centres[size]
            gap = t["loss"][lr] / t["best"] - 1
            res["rule_lr"][str(size)], res["within_1pct"][str(size)] = lr, gap <= 0.01
            print(
                f"size {size}: the rule's lr {lr:.4g} gives {t['loss'][lr]:.4f}, the sweep's best {t['best']:.4f}"
                f" at {t['best_lr']:.4g}: {100 * gap:+.2f}%, {'within' if gap <= 0.01 else 'NOT within'} 1%"
            )
    tag = f"{a.what}-{a.budget:.3g}" if a.budget else a.what
    (a.out / f"{tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
