"""Forward+backward time of one MoE layer against a dense SwiGLU FFN with the same activated FLOPs.

    python -m benchmarks.moe_layer [--json] [--tokens 4096] [--repeats 9] [--warmup 3] [--threads N]

``--json`` prints only the JSON result on stdout (the table goes to stderr), like ``moeforge report --json``.

Shapes follow DeepSeekMoE 2B scaled to a CPU: D = 256, 1 shared + 63 routed experts of width 128, top-7,
swiglu, fp32, balance loss a1 = 0.01 (its backward is timed too). The dense FFN has width
(shared + top-k) x 128 = 1024, so both layers do the same expert matmul FLOPs per token; the MoE layer also
pays for the router, the sort/gather/combine, and the balance loss. ``moe_over_dense`` is the ratio of
medians (the physical floor is about 1.0).

The same layer in HF transformers (``DeepseekV2Moe``, its default eager experts) gets the same weights,
its output is checked against ours before timing, and ``hf_over_moe`` is its median over ours (null where
transformers is not installed). Variants run interleaved (moe, dense, hf within each repeat) so drift in
clock or load from other processes hits them alike; the upstream gradient is random.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from moeforge.runtime import FeedForward, MoE
from torch import nn


def _hf_moe(moe: MoE, dim: int, hidden: int, n_routed: int, n_shared: int, top_k: int) -> nn.Module | None:
    """HF's DeepseekV2Moe at the same shapes holding `moe`'s weights, or None without transformers."""
    try:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    except ImportError:
        return None
    cfg = DeepseekV2Config(
        hidden_size=dim,
        moe_intermediate_size=hidden,
        n_routed_experts=n_routed,
        n_shared_experts=n_shared,
        num_experts_per_tok=top_k,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        hidden_act="silu",
        experts_implementation="eager",  # type: ignore[call-arg]  # HF's default per-expert loop, named so it does not warn
    )
    hf = DeepseekV2Moe(cfg)
    ex, sh = moe.experts, moe.shared
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ex.w1, ex.w3], dim=1))  # [E, 2F, D]: gate rows, then up
        hf.experts.down_proj.copy_(ex.w2)
        hf.shared_experts.gate_proj.weight.copy_(sh.w1.weight)
        hf.shared_experts.up_proj.weight.copy_(sh.w3.weight)
        hf.shared_experts.down_proj.weight.copy_(sh.w2.weight)
    return hf


def _step(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, up: torch.Tensor
) -> tuple[float, float]:
    """Wall and process CPU seconds of one forward+backward."""
    x.grad = None
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(x)
    if isinstance(out, tuple):  # ours: (out, aux); the balance loss takes part in backward
        torch.autograd.backward([out[0], out[1]], [up, torch.ones_like(out[1])])
    else:
        out.backward(up)
    return time.perf_counter() - t0, time.process_time() - c0


def run(
    dim: int = 256,
    hidden: int = 128,
    n_routed: int = 63,
    n_shared: int = 1,
    top_k: int = 7,
    tokens: int = 4096,
    seq_len: int = 2048,
    repeats: int = 9,
    warmup: int = 3,
    expert_alpha: float = 0.01,
    hf: bool = True,
    dispatches: tuple[str, ...] = (),
    seed: int = 0,
) -> dict:
    """Median forward+backward milliseconds of moe / dense / hf, and their ratios."""
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    seq_len = min(seq_len, tokens)
    B, S = max(tokens // seq_len, 1), seq_len
    moe = MoE(dim, n_routed, top_k, hidden, n_shared=n_shared, activation="swiglu", expert_alpha=expert_alpha)
    for p in moe.parameters():  # training-like init (the experts' own init is std 0.02 already)
        nn.init.normal_(p, std=0.02)
    dense = FeedForward(dim, (n_shared + top_k) * hidden, "swiglu")
    x = torch.randn(B, S, dim, requires_grad=True)
    up = torch.randn(B, S, dim)

    variants: dict[str, nn.Module] = {"moe": moe, "dense": dense}
    hf_mod = _hf_moe(moe, dim, hidden, n_routed, n_shared, top_k) if hf else None
    hf_max_abs_diff = None
    if hf_mod is not None:
        with torch.no_grad():
            ours, theirs = moe(x)[0], hf_mod(x)
        hf_max_abs_diff = float((ours - theirs).abs().max())
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)  # same layer, else timing is moot
        variants["hf"] = hf_mod
    for d in dispatches:  # the same layer forced to another dispatch, as "moe:<dispatch>"
        other = copy.deepcopy(moe)
        other.experts.dispatch = d
        variants[f"moe:{d}"] = other

    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    load_before = os.getloadavg()[0]
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            for m in variants.values():
                m.zero_grad(set_to_none=True)
            dt, dc = _step(fn, x, up)
            if r >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
    cpu_ms = {k: 1e3 * statistics.median(t) for k, t in cpu.items()}
    return {
        "moe_over_dense": ms["moe"] / ms["dense"],
        "hf_over_moe": ms["hf"] / ms["moe"] if "hf" in ms else None,
        "over_dense": {k: t / ms["dense"] for k, t in ms.items()},
        "median_ms": ms,
        # process CPU time: at one thread it is what the step cost whatever else the machine runs (other
        # processes stretch wall time, not CPU time); at more threads it also counts their waiting
        "median_cpu_ms": cpu_ms,
        "moe_over_dense_cpu": cpu_ms["moe"] / cpu_ms["dense"],
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "all_ms": {k: [round(1e3 * t, 3) for t in ts] for k, ts in times.items()},
        "shape": {
            "dim": dim,
            "hidden": hidden,
            "n_routed": n_routed,
            "n_shared": n_shared,
            "top_k": top_k,
            "tokens": B * S,
            "batch": B,
            "seq_len": S,
            "dense_hidden": (n_shared + top_k) * hidden,
            "expert_alpha": expert_alpha,
        },
        "dtype": "float32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "dispatch": moe.experts.resolved_dispatch(x.device, x.dtype),
        "hf_max_abs_diff": hf_max_abs_diff,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (the table to stderr)"
    )
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    p.add_argument(
        "--dispatch",
        action="append",
        default=[],
        choices=("fused_loop", "grouped_mm", "padded_bmm", "loop"),
        help="also time the layer forced to this dispatch (repeatable)",
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(
        tokens=a.tokens, repeats=a.repeats, warmup=a.warmup, hf=not a.no_hf, dispatches=tuple(a.dispatch)
    )
    table = sys.stderr if a.json else sys.stdout
    s = res["shape"]
    print(
        f"MoE layer fwd+bwd, T={s['tokens']} D={s['dim']} {s['n_shared']} shared + {s['n_routed']} routed "
        f"F={s['hidden']} top-{s['top_k']} vs dense F={s['dense_hidden']}, fp32, torch {res['torch']}, "
        f"{res['threads']} threads, dispatch {res['dispatch']}, median of {res['repeats']}",
        file=table,
    )
    moe_ms = res["median_ms"]["moe"]
    for k, t in res["median_ms"].items():
        spread = f"[{min(res['all_ms'][k]):.1f} .. {max(res['all_ms'][k]):.1f}]"
        print(f"  {k:<15} {t:9.1f} ms  {spread:<20} {t / moe_ms:6.3f}x moe", file=table)
    hf_ratio = f"{res['hf_over_moe']:.3f}" if res["hf_over_moe"] is not None else "n/a"
    print(f"  moe_over_dense {res['moe_over_dense']:.3f}   hf_over_moe {hf_ratio}", file=table)
    load = ", ".join(f"{v:.2f}" for v in res["load_avg_1min"])
    print(f"  by CPU time: moe_over_dense {res['moe_over_dense_cpu']:.3f}; load average {load}", file=table)
    if a.json:
        print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
