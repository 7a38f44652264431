"""Every fast dispatch of `Experts` agrees with its per-expert loop, forward and backward.

Gradients use a random upstream gradient: torch._grouped_mm's backward rejects the zero-stride gradient
that `out.sum().backward()` produces (our combine happens to materialise it, but tests should not rely
on that).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moeforge.runtime._experts import Experts, _expert_ranges, grouped_mm_supported

CPU = torch.device("cpu")
FAST = [
    "fused_loop",
    *(
        d
        for d in ("grouped_mm", "padded_bmm")
        if d != "grouped_mm" or grouped_mm_supported(CPU, torch.float32)
    ),
]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _routing(gen: torch.Generator, T: int, E: int, K: int, skip: tuple[int, ...] = ()):
    """Random distinct top-K experts per token avoiding `skip`, and random positive gate weights."""
    scores = torch.rand(T, E, generator=gen)
    scores[:, list(skip)] = -1.0
    idx_TK = scores.topk(K, dim=-1).indices
    w_TK = torch.rand(T, K, generator=gen) + 0.1
    return idx_TK, w_TK


def _grads(m: Experts, x, idx, w, up, fn):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = fn(x, idx, w)
    params = [p for p in (m.w1, m.w3, m.w2) if p is not None]
    return out, torch.autograd.grad(out, [x, w, *params], up)


def _check(m: Experts, x, idx, w, dispatch: str, seed: int = 0):
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    ref, ref_g = _grads(m, x, idx, w, up, m.forward_loop)
    m.dispatch = dispatch
    out, g = _grads(m, x, idx, w, up, m)
    torch.testing.assert_close(out, ref, **TOL)
    names = ["x", "gate", "w1", "w3", "w2"] if m.w3 is not None else ["x", "gate", "w1", "w2"]
    for name, a, b in zip(names, g, ref_g, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda s, n=name: f"grad {n}: {s}")


def _module(D: int, Fh: int, E: int, act: str, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    m = Experts(D, Fh, E, act)
    m.reset_parameters(std=0.5)  # larger weights than training init so errors would show
    return m


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("dispatch", [*FAST, "auto", "loop"])
def test_matches_loop_with_empty_experts(dispatch, act):
    gen = torch.Generator().manual_seed(1)
    m = _module(16, 12, 8, act)
    x = torch.randn(33, 16, generator=gen)
    idx, w = _routing(gen, 33, 8, 3, skip=(2, 5))  # experts 2 and 5 get nothing
    _check(m, x, idx, w, dispatch)
    assert m.last_counts_E.dtype == torch.int64
    assert m.last_counts_E.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    assert m.last_counts_E[2] == 0 and m.last_counts_E[5] == 0


@pytest.mark.parametrize("dispatch", FAST)
def test_single_token(dispatch):
    gen = torch.Generator().manual_seed(2)
    m = _module(8, 8, 6, "swiglu")
    idx, w = _routing(gen, 1, 6, 2)
    _check(m, torch.randn(1, 8, generator=gen), idx, w, dispatch)


@pytest.mark.parametrize("act", ["swiglu", "relu"])
@pytest.mark.parametrize("dispatch", FAST)
def test_all_tokens_to_one_expert(dispatch, act):
    gen = torch.Generator().manual_seed(3)
    m = _module(8, 16, 5, act)
    idx = torch.full((20, 1), 3)
    w = torch.rand(20, 1, generator=gen)
    _check(m, torch.randn(20, 8, generator=gen), idx, w, dispatch)
    assert m.last_counts_E.tolist() == [0, 0, 0, 20, 0]


@pytest.mark.parametrize("dispatch", FAST)
def test_unaligned_widths(dispatch):
    """D and F not multiples of 4 floats: the grouped path pads them to 16-byte strides."""
    gen = torch.Generator().manual_seed(4)
    m = _module(6, 5, 4, "swiglu")
    idx, w = _routing(gen, 11, 4, 2)
    _check(m, torch.randn(11, 6, generator=gen), idx, w, dispatch)


@settings(max_examples=20, deadline=None)
@given(
    T=st.integers(1, 40),
    E=st.integers(1, 9),
    K=st.integers(1, 4),
    D=st.sampled_from([4, 7, 16]),
    Fh=st.sampled_from([3, 8, 12]),
    act=st.sampled_from(["swiglu", "gelu"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_loop(T, E, K, D, Fh, act, seed):
    K = min(K, E)
    gen = torch.Generator().manual_seed(seed)
    m = _module(D, Fh, E, act, seed)
    idx, w = _routing(gen, T, E, K)
    x = torch.randn(T, D, generator=gen)
    for d in FAST:
        _check(m, x, idx, w, d, seed)


def _expected_keep(idx_TK: torch.Tensor, E: int, cap: int) -> torch.Tensor:
    """Each expert keeps its first `cap` pairs in token order (plain Python)."""
    seen = [0] * E
    keep = torch.zeros(idx_TK.shape, dtype=torch.bool)
    for t in range(idx_TK.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            keep[t, k] = seen[e] < cap
            seen[e] += 1
    return keep


@pytest.mark.parametrize("dispatch", [*FAST, "loop"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
def test_capacity_drops_the_overflow_in_token_order(dispatch, cf):
    gen = torch.Generator().manual_seed(5)
    T, E, K, D = 30, 6, 2, 8
    m = _module(D, 8, E, "swiglu")
    idx, w = _routing(gen, T, E, K)
    idx[:12, 0] = 1  # overload expert 1 so something drops at every cf here
    idx[:12, 1] = torch.where(idx[:12, 1] == 1, 0, idx[:12, 1])
    x = torch.randn(T, D, generator=gen)
    cap = math.ceil(cf * T * K / E)
    keep = _expected_keep(idx, E, cap)
    assert not keep.all()
    # Dropped pairs contribute nothing: the loop with their gates zeroed is the reference.
    up = torch.randn(T, D, generator=gen)
    ref, ref_g = _grads(m, x, idx, w * keep, up, m.forward_loop)
    m.dispatch = dispatch
    out, g = _grads(m, x, idx, w, up, lambda a, b, c: m(a, b, c, capacity_factor=cf))
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(g[1], ref_g[1] * keep, **TOL)  # no gradient to dropped gates
    for a, b in zip(g[:1] + g[2:], ref_g[:1] + ref_g[2:], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert float(m.last_dropped_fraction) == pytest.approx((~keep).sum().item() / (T * K))
    assert m.last_counts_E.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()  # before drops


def test_capacity_as_constructor_field_and_dropless_default():
    gen = torch.Generator().manual_seed(6)
    idx, w = _routing(gen, 16, 4, 2)
    x = torch.randn(16, 8, generator=gen)
    torch.manual_seed(0)
    m = Experts(8, 8, 4, capacity_factor=0.25)
    m(x, idx, w)
    assert float(m.last_dropped_fraction) > 0
    m.capacity_factor = None
    m(x, idx, w)
    assert float(m.last_dropped_fraction) == 0.0


def test_sum_backward_works():
    """The combine materialises the gradient, so even out.sum().backward() reaches _grouped_mm intact."""
    gen = torch.Generator().manual_seed(7)
    m = _module(8, 8, 4, "swiglu")
    idx, w = _routing(gen, 10, 4, 2)
    m(torch.randn(10, 8, generator=gen), idx, w).sum().backward()
    assert m.w1.grad is not None and m.w1.grad.abs().sum() > 0


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_fused_loop_without_grad_and_weight_grads_only(act):
    """Inference keeps no pre-activations; weights-only backward matches the loop's."""
    gen = torch.Generator().manual_seed(9)
    m = _module(16, 12, 5, act)
    x = torch.randn(30, 16, generator=gen)
    idx, w = _routing(gen, 30, 5, 2)
    m.dispatch = "fused_loop"
    with torch.no_grad():
        torch.testing.assert_close(m(x, idx, w), m.forward_loop(x, idx, w), **TOL)
    up = torch.randn(30, 16, generator=gen)
    params = [p for p in (m.w1, m.w3, m.w2) if p is not None]
    got = torch.autograd.grad(m(x, idx, w), params, up)
    ref = torch.autograd.grad(m.forward_loop(x, idx, w), params, up)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_cpu_autocast_bf16_fused_loop_close_to_fp32():
    gen = torch.Generator().manual_seed(10)
    m = _module(16, 16, 4, "swiglu")
    m.reset_parameters(std=0.1)
    x = torch.randn(20, 16, generator=gen)
    idx, w = _routing(gen, 20, 4, 2)
    m.dispatch = "fused_loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.requires_grad_(), idx, w)
    assert out.dtype == torch.float32
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, m.forward_loop(x, idx, w), rtol=5e-2, atol=5e-2)
    assert x.grad is not None and m.w1.grad is not None and m.w1.grad.dtype == torch.float32


def test_auto_and_bad_dispatch():
    m = Experts(8, 8, 4)
    prev = torch.get_num_threads()
    try:  # eager CPU: fused_loop at every thread count (it runs experts on threads itself; measured)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert m.resolved_dispatch(CPU, torch.float32) == "fused_loop"
    finally:
        torch.set_num_threads(prev)
    assert (
        m.resolved_dispatch(torch.device("meta"), torch.float32) == "padded_bmm"
    )  # no _grouped_mm probe there
    with pytest.raises(ValueError, match="dispatch"):
        Experts(8, 8, 4, dispatch="scatter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity_factor"):
        Experts(8, 8, 4, capacity_factor=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dispatch", ["auto", "grouped_mm", "padded_bmm"])
def test_cuda_autocast_bf16_close_to_fp32_loop(dispatch):
    dev = torch.device("cuda")
    if dispatch == "grouped_mm" and not grouped_mm_supported(dev, torch.bfloat16):
        pytest.skip("torch._grouped_mm not supported on this GPU for bf16")
    gen = torch.Generator().manual_seed(8)
    T, E, K, D, Fh = 256, 16, 4, 64, 32
    m = _module(D, Fh, E, "swiglu").to(dev)
    m.reset_parameters(std=0.1)
    idx, w = _routing(gen, T, E, K, skip=(3,))
    x, idx, w = torch.randn(T, D, generator=gen).to(dev), idx.to(dev), w.to(dev)
    up = torch.randn(T, D, generator=gen).to(dev)
    ref, ref_g = _grads(m, x, idx, w, up, m.forward_loop)
    m.dispatch = dispatch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, g = _grads(m, x, idx, w, up, m)
    assert out.dtype == torch.float32  # combined in x's dtype
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
    for a, b in zip(g, ref_g, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


def test_grouped_mm_probe_checks_gradients_and_empty_groups(monkeypatch):
    """The probe compares output, input and weight gradients with one matmul per group, with empty groups;
    a kernel whose forward is right but which leaves garbage in an empty group's weight gradient fails it."""
    from moeforge.runtime import _experts

    good = _experts.grouped_mm_errors(CPU, torch.float32)
    if good["error"] is not None:
        pytest.skip(f"torch._grouped_mm does not run on CPU here: {good['error']}")
    assert good["ok"] and good["grad_w_empty"] == 0.0
    assert max(good[k] for k in ("out", "grad_x", "grad_w")) < 1e-5
    real = torch._grouped_mm

    class _Bad(torch.autograd.Function):  # right forward and input gradient, wrong empty-group weight grads
        @staticmethod
        def forward(ctx, x, w, offs):
            ctx.save_for_backward(x, w, offs)
            return real(x, w, offs=offs)

        @staticmethod
        def backward(ctx, g):
            x, w, offs = ctx.saved_tensors
            with torch.enable_grad():
                x_, w_ = x.detach().requires_grad_(), w.detach().requires_grad_()
                gx, gw = torch.autograd.grad(real(x_, w_, offs=offs), [x_, w_], g)
            return gx, gw + 1e-3, None  # stale values in every group, empty ones included

    monkeypatch.setattr(torch, "_grouped_mm", lambda x, w, offs: _Bad.apply(x, w, offs))
    bad = _experts.grouped_mm_errors(CPU, torch.float32)
    assert not bad["ok"] and bad["grad_w_empty"] > 0 and bad["out"] == 0.0
    monkeypatch.setattr(_experts, "_GROUPED_MM_OK", {})
    assert not _experts.grouped_mm_supported(CPU, torch.float32)  # so auto would not pick it


@pytest.mark.parametrize("threads", [2, 3])
def test_fused_loop_on_threads_matches_loop(threads):
    """With several intra-op threads fused_loop runs ranges of experts on threads: the same results, the
    intra-op thread count restored, and one range where per-thread state would miss work (a FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(11)
    m = _module(16, 12, 9, "swiglu")
    x = torch.randn(60, 16, generator=gen)
    idx, w = _routing(gen, 60, 9, 3, skip=(4,))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        kept = torch.bincount(idx.flatten(), minlength=9).tolist()
        ranges = _expert_ranges(kept)
        assert len(ranges) == threads and ranges[0][0] == 0 and ranges[-1][1] == 9
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert _expert_ranges(kept, torch.device("meta")) == [
            (0, 9)
        ]  # off the CPU: a GPU stream is per thread
        _check(m, x, idx, w, "fused_loop")
        with torch.no_grad():  # the no-grad path splits too
            torch.testing.assert_close(m(x, idx, w), m.forward_loop(x, idx, w), **TOL)
        assert torch.get_num_threads() == threads
        with FlopCounterMode(display=False) as counter:
            assert _expert_ranges(kept) == [(0, 9)]
            m(x, idx, w)
        assert counter.get_total_flops() == 2 * 3 * 60 * 3 * 16 * 12  # every matmul seen: 3 per pair
    finally:
        torch.set_num_threads(prev)
