"""Forward+backward time of the routed experts alone, per dispatch, at DeepSeekMoE-2B-like CPU shapes.

    python -m benchmarks.moe_dispatch [--json] [--tokens 4096] [--repeats 7] [--warmup 2] [--threads N]

Shapes follow DeepSeekMoE 2B scaled to a CPU: D = 256, 63 routed experts of width 128, top-7, swiglu.
Routing is random (near balanced), the gate weights softmax-normalised, the upstream gradient random.
Dispatches run interleaved (one of each per repeat) so drift in clock or load hits them alike; the table
reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from moeforge.runtime import Experts


def _step(m: Experts, x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, up: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = m(x, idx, g)
    out.backward(up)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(
    dim: int = 256,
    hidden: int = 128,
    n_experts: int = 63,
    top_k: int = 7,
    tokens: int = 4096,
    repeats: int = 7,
    warmup: int = 2,
    dispatches: tuple[str, ...] = ("fused_loop", "grouped_mm", "padded_bmm", "loop"),
    seed: int = 0,
) -> dict:
    """Median forward+backward milliseconds per dispatch, and ratios to the loop."""
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    m = Experts(dim, hidden, n_experts, "swiglu")
    x = torch.randn(tokens, dim, requires_grad=True)
    idx = torch.rand(tokens, n_experts).topk(top_k, dim=-1).indices
    g = torch.rand(tokens, top_k).softmax(-1).requires_grad_()
    up = torch.randn(tokens, dim)
    times: dict[str, list[float]] = {d: [] for d in dispatches}
    for r in range(warmup + repeats):
        for d in dispatches:
            m.dispatch = d
            m.zero_grad(set_to_none=True)
            x.grad = g.grad = None
            dt = _step(m, x, idx, g, up)
            if r >= warmup:
                times[d].append(dt)
    ms = {d: 1e3 * statistics.median(t) for d, t in times.items()}
    m.dispatch = "auto"
    res: dict = {
        "shape": {"dim": dim, "hidden": hidden, "n_experts": n_experts, "top_k": top_k, "tokens": tokens},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "auto_picks": m.resolved_dispatch(x.device, x.dtype),
        "median_ms": ms,
        "all_ms": {d: [1e3 * t for t in ts] for d, ts in times.items()},
    }
    if "loop" in ms:
        if "grouped_mm" in ms:
            res["grouped_over_loop"] = ms["grouped_mm"] / ms["loop"]
        if "padded_bmm" in ms:
            res["padded_over_loop"] = ms["padded_bmm"] / ms["loop"]
        if "fused_loop" in ms:
            res["fused_over_loop"] = ms["fused_loop"] / ms["loop"]
    if "grouped_mm" in ms and "padded_bmm" in ms:
        res["grouped_over_padded"] = ms["grouped_mm"] / ms["padded_bmm"]
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (the table to stderr)"
    )
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(tokens=a.tokens, repeats=a.repeats, warmup=a.warmup)
    table = sys.stderr if a.json else sys.stdout
    s = res["shape"]
    print(
        f"Experts fwd+bwd, T={s['tokens']} D={s['dim']} E={s['n_experts']} F={s['hidden']} K={s['top_k']}, "
        f"torch {res['torch']}, {res['threads']} threads, median of {res['repeats']}",
        file=table,
    )
    loop = res["median_ms"].get("loop")
    for d, t in res["median_ms"].items():
        ratio = f"{t / loop:6.3f}x loop" if loop else ""
        print(f"  {d:<11} {t:9.1f} ms  {ratio}", file=table)
    print(f"  auto picks: {res['auto_picks']}", file=table)
    if a.json:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
