"""Throughput of `moeforge data prepare`: tokens per second, and per core.

    python -m benchmarks.prepare [--json] [--vocab 1024] [--workers 1 2] [--max-mb 16]

The source is the bundled corpus (the Python standard library's sources, up to 16 MB, no download). A
byte-level BPE of `--vocab` is trained once on it (not timed); then each worker count prepares the whole
source into a fresh folder with that tokenizer, end to end (reading, tokenizing, writing shards, fsync,
meta.json). Tokens/s per core = tokens / wall seconds / workers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from moeforge.runtime import prepare_data


def run(vocab: int = 1024, workers: tuple[int, ...] = (1, 2), source: str = "bundled") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_data([source], Path(tmp) / "tok", train_vocab=vocab, workers=max(workers))
        tok = str(Path(tmp) / "tok" / "tokenizer.json")
        rows = {}
        for n in workers:
            t0 = time.perf_counter()
            meta = prepare_data([source], Path(tmp) / f"w{n}", tokenizer=tok, workers=n)
            wall = time.perf_counter() - t0
            assert meta["fingerprint"] == base["fingerprint"]  # the same tokens whatever the workers
            tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            mb = (meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]) / 1e6
            rows[str(n)] = {
                "wall_s": round(wall, 3),
                "tokens": tokens,
                "tokens_per_s": round(tokens / wall),
                "tokens_per_s_per_core": round(tokens / wall / n),
                "mb_per_s": round(mb / wall, 2),
            }
    return {"source": source, "vocab": vocab, "bytes_per_token": base["bytes_per_token"], "workers": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--source", default="bundled", help="any prepare SRC (default the bundled corpus)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run(a.vocab, tuple(a.workers), a.source)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for n, r in res["workers"].items():
            print(
                f"workers {n}: {r['tokens']:,} tokens in {r['wall_s']:.2f} s = {r['tokens_per_s']:,} tok/s, "
                f"{r['tokens_per_s_per_core']:,} tok/s per core, {r['mb_per_s']} MB/s"
            )
    return res


if __name__ == "__main__":
    main()
