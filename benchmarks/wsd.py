"""WSD on the debug model: branched cooldowns against straight runs, WSD against cosine, the compute a
branched ladder saves, and AdamW's beta2 at small batch.

    python -m benchmarks.wsd ladder --out runs/wsd   # (a) branched = straight, (b) WSD vs cosine, (c) tokens
    python -m benchmarks.wsd beta2 --out runs/wsd    # beta2 in {0.95, 0.99, 0.999}, 2 seeds

One CPU thread; each result is appended to OUT/results.jsonl as it comes (a few minutes in all on one core).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from moeforge.compiler import account, build, load_spec
from moeforge.runtime import (
    TrainConfig,
    branch_point,
    ladder_tokens,
    load_corpus,
    train,
    train_cooldown,
    train_stable,
)

TOTALS = (200_000, 400_000, 800_000)  # a 4x ladder of token budgets
SEEDS = (0, 1)


def _log(out: Path, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def ladder(out: Path, batch: int) -> None:
    spec = load_spec("debug")
    fpt = account(spec).train_flops_per_token
    corpus = load_corpus(vocab_size=spec.vocab_size)
    kw = {"seq_len": spec.seq_len, "train_flops_per_token": fpt, "corpus": corpus, "progress": False}
    base = {"device": "cpu", "batch_size": batch, "eval_points": 1}
    warm = int(0.05 * TOTALS[0])  # 5% of the smallest budget, shared by all (the stable phase must be)

    def wsd(seed: int, tokens: int) -> TrainConfig:
        return TrainConfig(**base, seed=seed, tokens=tokens, schedule="wsd", warmup_tokens=warm)

    branched, separate = ladder_tokens(wsd(0, 1), TOTALS, spec.seq_len)
    points = [branch_point(wsd(0, 1), t, spec.seq_len) for t in TOTALS]
    _log(
        out,
        {"part": "c", "totals": TOTALS, "branch_points": points, "branched": branched, "separate": separate},
    )
    for seed in SEEDS:
        t0 = time.perf_counter()
        st = train_stable(
            build(spec, seed=seed), **kw, cfg=wsd(seed, 1), totals=TOTALS, out_dir=out / f"stable-s{seed}"
        )
        _log(
            out,
            {"part": "stable", "seed": seed, "tokens": st.summary.tokens, "s": time.perf_counter() - t0},
        )
        for t in TOTALS:
            s = train_cooldown(
                build(spec, seed=seed),
                **kw,
                cfg=wsd(seed, t),
                branch=st.branches[t],
                out_dir=out / f"cool-s{seed}-{t}",
            )
            _log(out, {"part": "wsd-branched", "seed": seed, "tokens": t, "loss": s.final_val_loss})
        for t in TOTALS:
            s = train(build(spec, seed=seed), **kw, cfg=TrainConfig(**base, seed=seed, tokens=t))
            _log(out, {"part": "cosine", "seed": seed, "tokens": t, "loss": s.final_val_loss})
    for t in TOTALS[:2]:
        s = train(build(spec, seed=0), **kw, cfg=wsd(0, t))
        _log(out, {"part": "wsd-straight", "seed": 0, "tokens": t, "loss": s.final_val_loss})


def beta2(out: Path, batch: int, tokens: int) -> None:
    spec = load_spec("debug")
    fpt = account(spec).train_flops_per_token
    corpus = load_corpus(vocab_size=spec.vocab_size)
    for b2 in (0.95, 0.99, 0.999):
        for seed in SEEDS:
            cfg = TrainConfig(
                device="cpu", batch_size=batch, eval_points=1, seed=seed, tokens=tokens, beta2=b2
            )
            s = train(
                build(spec, seed=seed),
                seq_len=spec.seq_len,
                train_flops_per_token=fpt,
                corpus=corpus,
                cfg=cfg,
                progress=False,
            )
            _log(
                out,
                {
                    "part": "beta2",
                    "beta2": b2,
                    "seed": seed,
                    "batch": batch,
                    "tokens": tokens,
                    "loss": s.final_val_loss,
                },
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("ladder", "beta2"))
    p.add_argument("--out", type=Path, default=Path("runs/wsd"))
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (ladder), 4 (beta2)")
    p.add_argument("--tokens", type=int, default=200_000, help="beta2: the budget in tokens")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "ladder":
        ladder(a.out, a.batch_size or 8)
    else:
        beta2(a.out, a.batch_size or 4, a.tokens)


if __name__ == "__main__":
    main()
