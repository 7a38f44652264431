"""One prepared check of the CUDA path: correctness first, then speed. A PASS/FAIL table, then JSON.

    python -m benchmarks.gpu_check [--out FILE] [--steps 30] [--peak-tflops 989] [--compile] [--no-train]

Checks, each a row of the table (on stderr) and an entry of the JSON report (on stdout, and in --out):

1. ``grouped_mm``: ``torch._grouped_mm`` against one matmul per group, forward, input and weight gradients,
   with skewed routing and empty groups (whose weight gradient must be exactly 0), per device and dtype;
   this is the probe `Experts` runs before ``auto`` picks it.
2. ``experts``: every dispatch of `Experts` (grouped_mm, padded_bmm, fused_loop) against the per-expert loop,
   output and the gradients of the input, the gates and all three weights, with skewed routing and empty
   experts, in fp32 and under bf16 autocast; which dispatch ``auto`` picks.
3. ``syncs`` (CUDA): host syncs in one training forward+backward of the debug model, counted by
   ``torch.cuda.set_sync_debug_mode("warn")``, against the expected count (tests/runtime/test_syncs.py).
4. ``moe_layer`` and ``training`` (CUDA): the MoE-vs-dense ratio of one layer under bf16 autocast, and a
   short training run of a ~100M-activated DeepSeekMoE model: tokens/s and MFU against --peak-tflops
   (H100/H200 SXM dense bf16: 989). Measurements: PASS means they ran.

Without CUDA it checks what the CPU can (rows 1-2 on the CPU) and marks the CUDA rows SKIP. Exits 1 if any
row FAILs, else 0. Takes a few minutes on a GPU (most of it the training run; --no-train skips it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from moeforge.compiler import account, build, load_spec
from moeforge.runtime import (
    HOST_SYNCS_PER_LAYER,
    Experts,
    FeedForward,
    MoE,
    grouped_mm_errors,
    grouped_mm_supported,
)

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

# Largest error of a dispatch against the loop, relative to the loop's largest entry. fp32: both sum the
# same products in another order. bf16 autocast: both run bf16 matmuls, the loop per expert, the fast paths
# with other blockings and, for the gate gradient, another rounding point.
TOL = {"fp32": 1e-4, "bf16": 5e-2}


def _row(rows: list[dict], check: str, where: str, status: str, detail: str, **data) -> dict:
    row = {"check": check, "where": where, "status": status, "detail": detail, **data}
    rows.append(row)
    return row


def _guard(rows: list[dict], check: str, where: str, fn) -> None:
    """Run one check; an exception is a FAIL row with its message, not the end of the script."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a row of the report
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        _row(rows, check, where, "FAIL", f"{type(e).__name__}: {str(e)[:200]} ({tb[:120]})")


# ---------------------------------------------------------------------------------------------- 1. grouped_mm


def check_grouped_mm(rows: list[dict], dev: torch.device) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        r = grouped_mm_errors(dev, dtype)
        where = f"{dev.type} {str(dtype).removeprefix('torch.')}"
        if r["error"] is not None:
            _row(
                rows,
                "grouped_mm",
                where,
                "SKIP",
                f"does not run ({r['error']}); auto uses another dispatch",
                **r,
            )
            continue
        detail = (
            f"out {r['out']:.1e}, grad x {r['grad_x']:.1e}, grad w {r['grad_w']:.1e}, "
            f"empty-group grad w {r['grad_w_empty']:.1e}"
        )
        if not r["ok"]:
            detail += "; auto falls back to padded_bmm here"
        _row(rows, "grouped_mm", where, "PASS" if r["ok"] else "FAIL", detail, **r)


# ---------------------------------------------------------------------------------------------- 2. experts


def _skewed_routing(gen: torch.Generator, T: int, E: int, K: int, empty: tuple[int, ...]):
    """Top-K of scores with a strong per-expert tilt (a few experts take most tokens) and some experts empty."""
    tilt = torch.linspace(0.6, 0.0, E)  # expert 0 is favoured most
    scores = torch.rand(T, E, generator=gen) + tilt
    scores[:, list(empty)] = -1.0
    return scores.topk(K, dim=-1).indices, torch.rand(T, K, generator=gen) + 0.1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_experts(rows: list[dict], dev: torch.device) -> None:
    small = dev.type == "cpu"
    T, D, Fh, E, K = (512, 128, 64, 16, 4) if small else (4096, 1024, 512, 64, 6)
    empty = (1, E // 2, E - 1)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ex = Experts(D, Fh, E, "swiglu").to(dev)
    ex.reset_parameters(std=0.05)
    idx, w = _skewed_routing(gen, T, E, K, empty)
    x0, up = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    idx, w, x0, up = idx.to(dev), w.to(dev), x0.to(dev), up.to(dev)
    counts = torch.bincount(idx.flatten().cpu(), minlength=E)
    skew = f"{int(counts.max())} rows max, {int((counts == 0).sum())} empty of {E}"

    def run(dispatch: str, bf16: bool):
        ex.dispatch = dispatch
        x, g = x0.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = ex(x, idx, g) if dispatch != "loop" else ex.forward_loop(x, idx, g)
        params = [ex.w1, ex.w3, ex.w2]
        grads = torch.autograd.grad(out, [x, g, *params], up)
        return dict(
            zip(["out", "grad_x", "grad_gate", "grad_w1", "grad_w3", "grad_w2"], [out, *grads], strict=True)
        )

    ref = run("loop", False)  # fp32 oracle
    for prec in ("fp32", "bf16"):
        for dispatch in ("grouped_mm", "padded_bmm", "fused_loop"):
            where = f"{dev.type} {prec} {dispatch}"
            if dispatch == "grouped_mm" and not grouped_mm_supported(
                dev, torch.bfloat16 if prec == "bf16" else torch.float32
            ):
                _row(rows, "experts", where, "SKIP", "grouped_mm unsupported or wrong here (row 1)")
                continue

            def one(dispatch=dispatch, prec=prec, where=where):
                got = run(dispatch, prec == "bf16")
                errs = {k: _rel(got[k], ref[k]) for k in ref}
                empty_w = max(
                    float(got[k][list(empty)].abs().max()) for k in ("grad_w1", "grad_w3", "grad_w2")
                )
                ok = all(v <= TOL[prec] for v in errs.values()) and empty_w == 0.0
                worst = max(errs, key=lambda k: errs[k])
                detail = f"worst {worst} {errs[worst]:.1e} (tol {TOL[prec]:.0e}), empty-expert grad w {empty_w:.1e}; {skew}"
                _row(
                    rows,
                    "experts",
                    where,
                    "PASS" if ok else "FAIL",
                    detail,
                    errors=errs,
                    empty_grad_w=empty_w,
                )

            _guard(rows, "experts", where, one)
    ex.dispatch = "auto"
    picks = {
        p: ex.resolved_dispatch(dev, dt) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    _row(
        rows,
        "auto",
        dev.type,
        "PASS",
        f"auto picks {picks['fp32']} (fp32), {picks['bf16']} (bf16) at {torch.get_num_threads()} threads",
        picks=picks,
    )


# ---------------------------------------------------------------------------------------------- 3. syncs


def cuda_sync_messages(step) -> list[str]:
    """What torch's sync debug mode reports during one call of `step` (after one warm-up call: probes and
    lazy inits may sync once)."""
    step()
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def check_syncs(rows: list[dict], dev: torch.device) -> None:
    """Host syncs of the MoE layers per training step: the debug model's minus its dense twin's (layers
    outside the MoE may sync inside torch on CUDA, e.g. the embedding's backward)."""

    def count(overrides: list[str], dispatch: str) -> int:
        spec = load_spec("debug", overrides)
        model = build(spec, seed=0).to(dev)
        model.train()
        for _, moe in model.moe_layers():
            moe.experts.dispatch = dispatch
        ids = torch.randint(0, spec.vocab_size, (4, spec.seq_len + 1), device=dev)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids[:, :-1])
                loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
            loss.backward()

        return len(cuda_sync_messages(step))

    n_moe = len(build(load_spec("debug"), device=torch.device("meta")).moe_layers())
    base = count(["moe=null"], "auto")
    for dispatch, per_layer in HOST_SYNCS_PER_LAYER.items():
        where = f"{dev.type} bf16 {dispatch}"
        if dispatch == "grouped_mm" and not grouped_mm_supported(dev, torch.bfloat16):
            _row(rows, "syncs", where, "SKIP", "grouped_mm unsupported or wrong here")
            continue

        def one(dispatch=dispatch, per_layer=per_layer, where=where):
            n = count([], dispatch) - base
            expected = per_layer * n_moe
            detail = (
                f"{n} host syncs per step in {n_moe} MoE layers, expected {expected} ({base} outside them)"
            )
            status = "PASS" if n == expected else "FAIL"
            _row(rows, "syncs", where, status, detail, syncs=n, expected=expected, outside_moe=base)

        _guard(rows, "syncs", where, one)


# ---------------------------------------------------------------------------------------------- 4. speed


def _timed(fn, repeats: int = 20, warmup: int = 5) -> float:
    """Median seconds of fn, timed with CUDA events (no host clock around asynchronous work)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return statistics.median(ts)


def moe_vs_dense(rows: list[dict], dev: torch.device) -> None:
    torch.manual_seed(0)
    D, Fh, E, S, K, T = 1024, 512, 63, 1, 7, 16384
    moe = MoE(D, E, K, Fh, n_shared=S, expert_alpha=0.01).to(dev)
    dense = FeedForward(D, (S + K) * Fh).to(dev)
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
    r = {"moe_ms": 1e3 * t_moe, "dense_ms": 1e3 * t_dense, "moe_over_dense": t_moe / t_dense}
    detail = f"MoE {r['moe_ms']:.2f} ms vs dense {r['dense_ms']:.2f} ms: {r['moe_over_dense']:.2f}x ({moe.experts.resolved_dispatch(dev, torch.bfloat16)})"
    _row(rows, "moe_layer", f"{dev.type} bf16", "PASS", detail, **r)


def training_mfu(rows: list[dict], dev: torch.device, steps: int, peak_tflops: float, compile: bool) -> None:
    from moeforge.runtime import TrainConfig, load_corpus, train

    spec = load_spec("debug", SPEC_100M)
    acc = account(spec)
    corpus = load_corpus(vocab_size=spec.vocab_size)
    model = build(spec, device=dev, seed=0)
    cfg = TrainConfig(
        steps=steps, batch_size=32, device=str(dev), compile=compile, eval_tokens=32768, eval_points=1
    )
    t0 = time.perf_counter()
    summary = train(
        model,
        seq_len=spec.seq_len,
        train_flops_per_token=acc.train_flops_per_token,
        corpus=corpus,
        cfg=cfg,
        progress=False,
    )
    tps = summary.tokens_per_second or 0.0
    achieved = tps * acc.train_flops_per_token
    r = {
        "params_activated": acc.params_activated,
        "train_flops_per_token": acc.train_flops_per_token,
        "compile": compile,
        "tokens_per_second": tps,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak_tflops * 1e12),
        "final_val_loss": summary.final_val_loss,
        "wall_s": time.perf_counter() - t0,
    }
    detail = f"{tps:,.0f} tokens/s, {r['achieved_tflops']:.1f} TFLOP/s, MFU {r['mfu']:.1%} ({steps} steps{', compiled' if compile else ''})"
    _row(rows, "training", f"{dev.type} bf16", "PASS", detail, **r)


# ---------------------------------------------------------------------------------------------- report


def _table(rows: list[dict]) -> str:
    w_check = max(len(r["check"]) for r in rows)
    w_where = max(len(r["where"]) for r in rows)
    lines = [f"{'check':<{w_check}}  {'where':<{w_where}}  status  detail"]
    lines += [
        f"{r['check']:<{w_check}}  {r['where']:<{w_where}}  {r['status']:<6}  {r['detail']}" for r in rows
    ]
    n = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(f"{n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP")
    return "\n".join(lines)


def run(steps: int = 30, peak_tflops: float = 989.0, compile: bool = False, train_run: bool = True) -> dict:
    torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()
    rows: list[dict] = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    for dev in devices:
        _guard(rows, "grouped_mm", dev.type, lambda dev=dev: check_grouped_mm(rows, dev))
        _guard(rows, "experts", dev.type, lambda dev=dev: check_experts(rows, dev))
    if cuda:
        dev = torch.device("cuda")
        _guard(rows, "syncs", "cuda", lambda: check_syncs(rows, dev))
        _guard(rows, "moe_layer", "cuda", lambda: moe_vs_dense(rows, dev))
        if train_run:
            _guard(rows, "training", "cuda", lambda: training_mfu(rows, dev, steps, peak_tflops, False))
            if compile:
                _guard(
                    rows,
                    "training",
                    "cuda compiled",
                    lambda: training_mfu(rows, dev, steps, peak_tflops, True),
                )
    else:
        for check in ("syncs", "moe_layer", "training"):
            _row(rows, check, "cuda", "SKIP", "no CUDA device")
    return {
        "ok": not any(r["status"] == "FAIL" for r in rows),
        "cuda": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--compile", action="store_true", help="also time the training run under torch.compile")
    ap.add_argument("--no-train", action="store_true", help="skip the training run")
    args = ap.parse_args(argv)
    rep = run(args.steps, args.peak_tflops, args.compile, not args.no_train)
    print(f"gpu_check on {rep['device']} (torch {rep['torch']}):", file=sys.stderr)
    print(_table(rep["rows"]), file=sys.stderr)
    text = json.dumps(rep, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
