"""One prepared check of the CUDA path, for a machine with an NVIDIA GPU.

    python -m benchmarks.gpu_check [--out FILE] [--steps 30] [--peak-tflops 989]

1. grouped_mm vs loop agreement of the experts in bf16 (outputs and gradients), and which dispatch `auto` picks;
2. the MoE-vs-dense ratio of one layer (benchmarks.moe_layer shapes scaled up for a GPU) under bf16 autocast;
3. a short training run of a ~100M-activated-parameter DeepSeekMoE model (bf16 autocast, optional
   torch.compile): tokens/s, achieved training FLOP/s from the analytic count, and MFU against the peak
   dense bf16 throughput given (H100/H200 SXM: 989 TFLOP/s).
Exits 0 with a JSON report; skips (exit 0, "cuda": false) without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from moeforge.compiler import account, build, load_spec
from moeforge.runtime import Experts, FeedForward, MoE, TrainConfig, load_corpus, train

# ~100M activated parameters: 12 x (attention 2.4M + (2 shared + top-6) x 3 x 768 x 384 = 7.1M) + embeddings.
SPEC_100M = [
    "name=moe-100m",
    "d_model=768",
    "n_layers=12",
    "seq_len=1024",
    "attention.n_heads=12",
    "ffn.hidden=3072",
    "moe.routed_experts=64",
    "moe.shared_experts=2",
    "moe.top_k=6",
    "moe.expert_hidden=384",
]


def _timed(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def check_agreement(dev: torch.device) -> dict:
    torch.manual_seed(0)
    T, D, F, E, K = 4096, 1024, 512, 64, 6
    ex = Experts(D, F, E, "swiglu").to(dev)
    x = torch.randn(T, D, device=dev, requires_grad=True)
    idx = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)])
    w = torch.rand(T, K, device=dev)
    up = torch.randn(T, D, device=dev)
    out = {}
    for name in ("grouped_mm", "padded_bmm", "loop"):
        ex.dispatch = name
        x.grad = None
        ex.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = ex(x, idx, w)
        y.backward(up)
        out[name] = (y.float().detach(), x.grad.float().clone(), ex.w1.grad.float().clone())
    ref = out["loop"]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    ex.dispatch = "auto"
    return {
        "auto_picks": ex.resolved_dispatch(dev, torch.bfloat16),
        **{
            f"{n}_vs_loop_rel": {
                "out": rel(o[0], ref[0]),
                "grad_x": rel(o[1], ref[1]),
                "grad_w1": rel(o[2], ref[2]),
            }
            for n, o in out.items()
            if n != "loop"
        },
    }


def moe_vs_dense(dev: torch.device) -> dict:
    torch.manual_seed(0)
    D, F, E, S, K, T = 1024, 512, 63, 1, 7, 16384
    moe = MoE(D, E, K, F, n_shared=S, expert_alpha=0.01).to(dev)
    dense = FeedForward(D, (S + K) * F).to(dev)
    x = torch.randn(4, T // 4, D, device=dev, requires_grad=True)
    up = torch.randn_like(x)

    def step(m):
        def fn():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(x)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(up)

        return fn

    t_moe, t_dense = _timed(step(moe)), _timed(step(dense))
    return {"moe_ms": 1e3 * t_moe, "dense_ms": 1e3 * t_dense, "moe_over_dense": t_moe / t_dense}


def training_mfu(dev: torch.device, steps: int, peak_tflops: float, compile: bool) -> dict:
    spec = load_spec("debug", SPEC_100M)
    acc = account(spec)
    corpus = load_corpus(vocab_size=spec.vocab_size)
    model = build(spec, device=dev, seed=0)
    cfg = TrainConfig(
        steps=steps, batch_size=32, device=str(dev), compile=compile, eval_tokens=32768, eval_points=1
    )
    summary = train(
        model,
        seq_len=spec.seq_len,
        train_flops_per_token=acc.train_flops_per_token,
        corpus=corpus,
        cfg=cfg,
        progress=False,
    )
    tps = summary["tokens_per_second"]
    achieved = tps * acc.train_flops_per_token
    return {
        "params_activated": acc.params_activated,
        "train_flops_per_token": acc.train_flops_per_token,
        "compile": compile,
        "tokens_per_second": tps,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak_tflops * 1e12),
        "final_val_loss": summary.get("final_val_loss"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--compile", action="store_true", help="also time the training run under torch.compile")
    args = ap.parse_args()
    rep: dict = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
    if rep["cuda"]:
        dev = torch.device("cuda")
        rep["device"] = torch.cuda.get_device_name(dev)
        rep["agreement_bf16"] = check_agreement(dev)
        rep["moe_layer"] = moe_vs_dense(dev)
        rep["training"] = [training_mfu(dev, args.steps, args.peak_tflops, compile=False)]
        if args.compile:
            rep["training"].append(training_mfu(dev, args.steps, args.peak_tflops, compile=True))
    text = json.dumps(rep, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
