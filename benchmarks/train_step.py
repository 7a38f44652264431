"""Training-step throughput of the debug model, and how much of a step is not matrix multiplication.

    python -m benchmarks.train_step [--json] [--spec debug] [--batch-size 16] [--repeats 10] [--threads 1]

A step is what `runtime.train` does per optimizer step: forward, cross entropy + balance loss, backward,
global-norm clipping, AdamW. Tokens/s is the median over `repeats` timed steps after warmup. The share
outside matmuls comes from one torch.profiler pass over a few steps: the self CPU time of aten::mm, bmm,
addmm, addbmm, baddbmm, _grouped_mm (matmul ops) and of the attention kernel, against the self time of all
ops. Denormals are flushed (tiny gradients otherwise slow CPU matmuls by orders of magnitude).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from moeforge.compiler import account, build, load_spec
from moeforge.runtime import TrainConfig, load_corpus, make_optimizer

MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addbmm", "aten::baddbmm", "aten::_grouped_mm")
ATTENTION_PREFIX = "aten::_scaled_dot_product"


def run(
    spec_name: str = "debug", batch_size: int = 16, repeats: int = 10, warmup: int = 3, threads: int = 1
) -> dict:
    """Median step time and tokens/s, and the profiled shares of matmul, attention and everything else."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    spec = load_spec(spec_name)
    fpt = account(spec).train_flops_per_token
    corpus = load_corpus(vocab_size=spec.vocab_size)
    model = build(spec, seed=0)
    model.train()
    cfg = TrainConfig(steps=1, batch_size=batch_size, device="cpu")
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(0)
    batches = [corpus.sample_batch("train", batch_size, spec.seq_len, gen) for _ in range(4)]

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        out = model(x)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten()) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the host sync train() does every step

    for i in range(warmup):
        step(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch_size * spec.seq_len

    from torch.profiler import ProfilerActivity, profile

    n_prof = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n_prof):
            step(i)
    by_op: dict[str, float] = {}
    for ev in prof.key_averages():
        by_op[ev.key] = by_op.get(ev.key, 0.0) + ev.self_cpu_time_total  # microseconds
    total = sum(by_op.values())
    matmul = sum(v for k, v in by_op.items() if k in MATMUL_OPS)
    attention = sum(v for k, v in by_op.items() if k.startswith(ATTENTION_PREFIX))
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    experts = model.moe_layers()[0][1].experts if model.moe_layers() else None
    return {
        "spec": spec_name,
        "batch_size": batch_size,
        "seq_len": spec.seq_len,
        "threads": threads,
        "dispatch": experts.resolved_dispatch(torch.device("cpu"), torch.float32)
        if experts is not None
        else None,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s,
        "flops_per_s": tokens * fpt / step_s,
        "matmul_share": matmul / total,
        "attention_share": attention / total,
        "outside_matmul_share": 1 - matmul / total,
        "outside_matmul_and_attention_share": 1 - (matmul + attention) / total,
        "profiled_op_ms_per_step": total / 1e3 / n_prof,
        "top_ops_ms_per_step": {k: round(v / 1e3 / n_prof, 3) for k, v in top},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="debug")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    r = run(a.spec, a.batch_size, a.repeats, a.warmup, a.threads)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"{r['spec']}: {r['tokens_per_s']:,.0f} tok/s ({r['step_ms']:.1f} ms/step, {r['flops_per_s'] / 1e9:.2f} GFLOP/s, "
        f"{r['threads']} thread(s), dispatch {r['dispatch']})"
    )
    print(
        f"share of op time: matmul {r['matmul_share']:.1%}, attention {r['attention_share']:.1%}, "
        f"everything else {r['outside_matmul_and_attention_share']:.1%}"
    )
    for k, v in r["top_ops_ms_per_step"].items():
        print(f"  {v:8.3f} ms  {k}")


if __name__ == "__main__":
    main()
