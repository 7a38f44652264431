"""One process of a test run: `torchrun ... tests/runtime/dist_worker.py '<json>'`, or `run(options)` in-process.

Trains the debug spec with `moeforge.runtime.train` (which joins torchrun's process group itself) and, when
`stop_at` is given, stops the run at that evaluation point as a crash would (after a checkpoint every step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Stop(Exception):
    pass


def run(o: dict) -> dict | None:
    from moeforge.compiler import account, build, load_spec
    from moeforge.runtime import TrainConfig, load_corpus, train

    spec = load_spec("debug", o.get("set", []))
    cfg = TrainConfig(
        steps=None if "tokens" in o else o.get("steps", 6),
        tokens=o.get("tokens"),
        batch_size=o.get("batch_size", 8),
        micro_batch_size=o.get("micro_batch_size", 4),  # a rank's share of the batch of 8 on 2 processes
        device="cpu",
        parallel=o.get("parallel", "ddp"),
        eval_tokens=1024,
        eval_points=o.get("eval_points", 2),
        log_every=1,
        checkpoint_every_s=0.0,
        seed=o.get("seed", 0),
    )

    def on_eval(frac: float, _metrics: dict) -> None:
        if o.get("stop_at") is not None and frac >= o["stop_at"]:
            raise Stop

    try:
        return train(
            build(spec, seed=cfg.seed),
            seq_len=spec.seq_len,
            train_flops_per_token=account(spec).train_flops_per_token,
            corpus=load_corpus(vocab_size=spec.vocab_size),
            cfg=cfg,
            out_dir=Path(o["out"]),
            resume=o.get("resume", False),
            on_eval=on_eval,
            progress=False,
        )
    except Stop:
        return None


if __name__ == "__main__":
    import torch
    from moeforge.runtime import close_distributed

    torch.set_num_threads(1)
    try:
        run(json.loads(sys.argv[1]))
    finally:
        close_distributed()
