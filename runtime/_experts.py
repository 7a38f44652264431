"""Routed experts with stacked weights, and how tokens reach them.

Legend: T tokens, D model dim, E routed experts, K routed experts per token, F expert hidden width,
N = T*K token-expert pairs (fewer once a capacity drops some), C rows per expert in a padded buffer.

Weights are stacked per expert in nn.Linear's (out, in) convention so a grouped matmul can use them as is:
w1 [E, F, D] (gate for swiglu, up otherwise), w3 [E, F, D] (up, swiglu only), w2 [E, D, F] (down).

Dispatch (dropless, as in DeepSeekMoE / MegaBlocks): flatten the T*K routing pairs, stable-sort them by
expert so each expert's tokens are contiguous and stay in token order, gather the tokens once, run every
expert at once, and add each result into its token's row: out_t = sum_k g_tk * y_tk. The gate scales the
hidden activation (g W2 h = W2 (g h), on [N, F] rather than [N, D]), and the combine is one index_add_ whose
backward is one gather, so no [N, D] buffer in pair order is made. How "every expert at once" is done is
`dispatch`:

* ``grouped_mm``: ``torch._grouped_mm`` over the sorted rows with ``offs`` = cumulative counts; no padding,
  no per-expert Python loop. Needs 16-byte aligned strides, so D and F are zero-padded when they are not
  (zero rows/columns add nothing, and act(0) * 0 = 0 for every activation here).
* ``padded_bmm``: gather the tokens straight into an [E, C, D] buffer, C = the largest count (padding rows
  read token 0 with gate 0, so they contribute exactly 0), and use ``torch.bmm`` with the stacked weights.
  Wastes E*C - N rows when routing is skewed, but makes 9 calls per step instead of 9*E: on an
  oversubscribed multi-threaded CPU it suffers far less from thread-barrier stalls than ``grouped_mm``.
* ``fused_loop``: a Python loop over experts inside one autograd Function (`_FusedExperts`): each expert
  gathers its rows, runs gate and up into one [n, 2F] buffer, the activation and gate, the down matmul, adds into
  the output while its ~0.5 MB of temporaries are in cache; backward regathers and recomputes per expert.
  No [N, D] buffer and no extra pass over [N, F] in either direction. With several intra-op threads, ranges
  of experts run on threads of their own, one intra-op thread each (OpenMP splits small matmuls badly).
  Fastest eager path on CPU, where a kernel launch costs nothing; one host sync per layer (the counts).
* ``loop``: `forward_loop`, the plain per-expert loop: obviously right, slow, and the test oracle.
* ``auto``: on CPU in eager mode ``fused_loop`` at every thread count (`cpu_eager_dispatch`, measured);
  otherwise ``grouped_mm`` where a tiny probe (once per device type and dtype) shows it right
  forward and backward, empty groups included, else ``padded_bmm`` (and ``padded_bmm`` when torch.compile
  traces a non-bf16 CPU model).

Host syncs: none per layer for ``grouped_mm`` (offsets stay on the device); one for ``fused_loop`` and
``padded_bmm`` (the kept counts size the loop or the buffer) and for any fast path with a capacity (it sizes
the kept pairs); counts use no ``torch.bincount`` (which syncs on CUDA). tests/runtime/test_syncs.py counts
them.

HOST_SYNCS_PER_LAYER = {"grouped_mm": 0, "fused_loop": 1, "padded_bmm": 1} for a dropless training step
(``loop``, the oracle, syncs once per expert); tests/runtime/test_syncs.py and benchmarks/gpu_check.py
hold the code to it.

Optional capacity (GShard / Switch Transformer baselines): each expert keeps its first
ceil(capacity_factor * T * K / E) pairs in token order; the rest contribute 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

Dispatch = Literal["auto", "grouped_mm", "padded_bmm", "fused_loop", "loop"]
DISPATCHES: tuple[str, ...] = ("auto", "grouped_mm", "padded_bmm", "fused_loop", "loop")

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


HOST_SYNCS_PER_LAYER = {"grouped_mm": 0, "fused_loop": 1, "padded_bmm": 1}
"""Host syncs of one MoE layer per dropless training step, by dispatch (with a capacity: 1 for each)."""


def count_per_expert(idx: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in `idx` (int64 [n]), without a host sync.

    ``torch.bincount`` would give the same counts, but on CUDA it reads the largest index back to the host to
    size its output, a sync per call; scattering ones into a zeros tensor of the known size does not.
    """
    idx = idx.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` is right here, forward and backward (probed once per device type, dtype)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    return bool(grouped_mm_errors(device, dtype)["ok"])


# Largest error allowed against the fp32 per-group reference, relative to the reference's largest entry.
_GROUPED_MM_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def grouped_mm_errors(device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Check ``torch._grouped_mm`` against one matmul per group, forward and backward, the way `Experts` calls it.

    Routing is skewed and has empty groups at the start, in the middle and at the end: fine-grained experts
    are empty all the time, and upstream bugs have given non-zero weight gradients for empty groups (and
    wrong results past the first empty one). The upstream gradient is random (``_grouped_mm``'s backward
    rejects the zero-stride gradient of ``out.sum().backward()``).

    Returns:
        ``out``, ``grad_x``, ``grad_w``: the largest error over the largest reference entry; ``grad_w_empty``:
        the largest weight gradient of an empty group (must be exactly 0); ``ok``: all within tolerance;
        ``error``: why it could not run, or None.
    """
    res: dict = {
        "out": None,
        "grad_x": None,
        "grad_w": None,
        "grad_w_empty": None,
        "ok": False,
        "error": None,
    }
    if not hasattr(torch, "_grouped_mm") or device.type == "meta":
        res["error"] = "torch._grouped_mm is not available" if device.type != "meta" else "meta device"
        return res
    counts = [0, 21, 0, 0, 7, 3, 1, 0]  # skewed; empty first, middle and last
    E, D, Fh, N = len(counts), 32, 48, sum(counts)
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            x0 = torch.randn(N, D, generator=gen).to(device, dtype)
            w0 = torch.randn(E, Fh, D, generator=gen).to(device, dtype)  # [E, F, D] like Experts.w1
            g0 = torch.randn(N, Fh, generator=gen).to(device, dtype)
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.backward(g0)
            assert x.grad is not None and w.grad is not None
            got = {"out": y.detach().float(), "grad_x": x.grad.float(), "grad_w": w.grad.float()}
    except (RuntimeError, NotImplementedError, TypeError, AssertionError) as e:
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return res
    # fp32 reference from the same (rounded) inputs, one group at a time
    x32, w32, g32 = x0.float(), w0.float(), g0.float()
    ref = {"out": torch.zeros(N, Fh), "grad_x": torch.zeros(N, D), "grad_w": torch.zeros(E, Fh, D)}
    s = 0
    for g, n in enumerate(counts):
        xe, ge = x32[s : s + n].cpu(), g32[s : s + n].cpu()
        ref["out"][s : s + n] = xe @ w32[g].cpu().t()
        ref["grad_x"][s : s + n] = ge @ w32[g].cpu()
        ref["grad_w"][g] = ge.t() @ xe
        s += n
    for k, r in ref.items():
        res[k] = float((got[k].cpu() - r).abs().max() / r.abs().max())
    empty = [e for e, n in enumerate(counts) if n == 0]
    res["grad_w_empty"] = float(got["grad_w"][empty].abs().max())
    tol = _GROUPED_MM_TOL.get(dtype, 3e-2)
    res["ok"] = all(res[k] <= tol for k in ref) and res["grad_w_empty"] == 0.0
    return res


def cpu_eager_dispatch(dtype: torch.dtype = torch.float32, threads: int | None = None) -> str:
    """What ``auto`` runs on the CPU in eager mode at `threads` intra-op threads (default: torch's current).

    ``fused_loop`` at every thread count, measured side by side (docs/performance.md; ``python -m
    benchmarks.moe_layer --threads N --dispatch ...``): at one thread each expert's work stays in cache and a
    call costs no launch; at more it runs ranges of experts on threads with one intra-op thread each
    (`_on_threads`), where ``grouped_mm`` and ``padded_bmm`` split every small matmul with OpenMP and stall
    at its barriers, badly so when other processes share the cores. `dtype` and `threads` are arguments so a
    measured rule that depends on them has its place here.
    """
    del dtype, threads
    return "fused_loop"


def _act(name: str):
    return {"gelu": F.gelu, "relu": F.relu}[name]


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of `t` up to a multiple of `multiple` (no copy when already there)."""
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


class Experts(nn.Module):
    """E feed-forward experts of width `hidden` over `dim`, applied to routed tokens.

    Args:
        dim: model width D.
        hidden: expert hidden width F.
        n_experts: routed experts E.
        activation: ``swiglu`` (w1 gate, w3 up), ``gelu`` or ``relu``.
        dispatch: how tokens reach the experts (see the module docstring); an attribute, so it can be
            changed after construction.
        capacity_factor: None for dropless; else each expert keeps ceil(cf * T * K / E) pairs.

    After each forward, ``last_counts_E`` (int64, detached) holds the tokens routed to each expert before
    any capacity drop, and ``last_dropped_fraction`` (0-d float tensor, detached) the share of the T*K
    pairs that the capacity dropped.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_experts: int,
        activation: str = "swiglu",
        dispatch: Dispatch = "auto",
        capacity_factor: float | None = None,
    ):
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch: {dispatch!r} is not one of {', '.join(DISPATCHES)}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor: {capacity_factor} must be > 0, or None for dropless")
        self.dim, self.hidden, self.n_experts, self.activation = dim, hidden, n_experts, activation
        self.dispatch: Dispatch = dispatch
        self.capacity_factor = capacity_factor
        self._act_fn = F.silu if activation == "swiglu" else _act(activation)
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.last_counts_E: torch.Tensor | None = None
        self.last_dropped_fraction: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        if self.w1.device.type == "meta":
            return
        for w in (self.w1, self.w3, self.w2):
            if w is not None:
                nn.init.normal_(w, std=std)

    # ---- the reference ------------------------------------------------------------------------------

    def _ffn(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        h_NF = self._act_fn(x_ND @ self.w1[e].t())  # silu(gate) for swiglu
        if self.w3 is not None:
            h_NF = h_NF * (x_ND @ self.w3[e].t())
        return h_NF @ self.w2[e].t()

    def forward_loop(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor
    ) -> torch.Tensor:
        """out_t = sum_k w_tk * expert_{idx_tk}(x_t), one expert at a time (the reference)."""
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.n_experts):
            tok, slot = torch.where(topk_idx_TK == e)
            if tok.numel() == 0:
                continue
            y_ND = self._ffn(e, x_TD[tok]) * topk_w_TK[tok, slot, None].to(x_TD.dtype)
            out_TD.index_add_(0, tok, y_ND.to(out_TD.dtype))
        return out_TD

    # ---- the fast paths -----------------------------------------------------------------------------

    def resolved_dispatch(self, device: torch.device, dtype: torch.dtype) -> str:
        """The dispatch `forward` uses for inputs computed in `dtype` on `device` (resolves ``auto``)."""
        if self.dispatch != "auto":
            return self.dispatch
        if torch.compiler.is_compiling():
            if device.type == "cpu" and dtype != torch.bfloat16:
                return "padded_bmm"  # inductor lowers _grouped_mm on CPU for bf16 only
        elif device.type == "cpu":
            return cpu_eager_dispatch(dtype)
        return "grouped_mm" if grouped_mm_supported(device, dtype) else "padded_bmm"

    def forward(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_w_TK: torch.Tensor,
        capacity_factor: float | None = None,
    ) -> torch.Tensor:
        """Weighted sum of each token's K experts; `capacity_factor` overrides the module's when given."""
        T, K = topk_idx_TK.shape
        E = self.n_experts
        cf = self.capacity_factor if capacity_factor is None else capacity_factor
        idx_N = topk_idx_TK.reshape(-1)  # pair n = t*K + k, token-major
        counts_E = count_per_expert(idx_N, E)
        self.last_counts_E = counts_E.detach()
        # Under autocast the matmuls run in the autocast dtype; cast explicitly because autocast may not
        # cover torch._grouped_mm, and so all paths see the same inputs.
        dtype = x_TD.dtype
        if torch.is_autocast_enabled(x_TD.device.type):
            dtype = torch.get_autocast_dtype(x_TD.device.type)
        mode = self.resolved_dispatch(x_TD.device, dtype)

        # Sort pairs by expert; stability keeps each expert's pairs in token order (capacity drops the last).
        order_N = torch.argsort(idx_N, stable=True)  # sorted position -> pair
        cap = None if cf is None else math.ceil(cf * T * K / E)
        kept_E = counts_E if cap is None else counts_E.clamp(max=cap)
        self.last_dropped_fraction = (
            torch.zeros((), device=x_TD.device)  # dropless: nothing to compute per forward
            if cap is None
            else ((counts_E - kept_E).sum() / max(T * K, 1)).float().detach()
        )
        # Host syncs: none for grouped_mm without a capacity; else this one, the only one per layer, for the
        # sizes a Python loop (fused_loop), a padded buffer (padded_bmm) or the kept pairs (capacity) need.
        # (`loop`, the oracle, syncs once per expert in torch.where.)
        kept = None
        if mode in ("fused_loop", "padded_bmm") or (cap is not None and mode != "loop"):
            kept = kept_E.tolist()  # the one host sync
        if cap is not None and mode != "loop":
            assert kept is not None
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            rank_N = torch.arange(T * K, device=idx_N.device) - starts_E[idx_N[order_N]]
            # the kept sorted positions, still sorted by expert, <= cap per expert: a stable sort puts them
            # first, and their number is known on the host, so nothing syncs as a boolean mask index would
            # (nonzero_static would do too, but has no CUDA kernel before torch 2.6; the floor is 2.4)
            order_N = order_N[torch.argsort((rank_N >= cap).to(torch.uint8), stable=True)[: sum(kept)]]

        if mode == "loop":
            if cap is not None:  # zero the gate of dropped pairs: no output and no gradient through them
                keep_N = torch.empty_like(idx_N, dtype=torch.bool)
                starts_E = torch.cumsum(counts_E, 0) - counts_E
                rank_N = torch.arange(T * K, device=idx_N.device) - starts_E[idx_N[order_N]]
                keep_N[order_N] = rank_N < cap
                topk_w_TK = topk_w_TK * keep_N.view(T, K).to(topk_w_TK.dtype)
            return self.forward_loop(x_TD, topk_idx_TK, topk_w_TK)
        if T * K == 0:
            return torch.zeros_like(x_TD)

        tok_N = order_N // K  # token of each sorted (kept) pair
        x_TD_c = x_TD.to(dtype)  # cast T rows, not N
        # The gate scales the expert's hidden activation instead of its output: g * W2 h = W2 (g h), and
        # [N, F] is narrower than [N, D], so no [N, D] weighted copy or pair-order buffer is made.
        g_N1 = topk_w_TK.reshape(-1, 1).index_select(0, order_N).to(dtype)
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
        w3 = None if self.w3 is None else self.w3.to(dtype)
        if mode == "grouped_mm":
            x_sorted_ND = x_TD_c.index_select(0, tok_N)  # each token once per chosen expert
            y_sorted_ND = self._grouped(x_sorted_ND, g_N1, kept_E, w1, w3, w2)
        elif mode == "fused_loop":
            assert kept is not None
            args = (x_TD_c, g_N1, w1, w3, w2, tok_N, kept, self.activation)
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
                out_TD = _FusedExperts.apply(*args)
            else:  # nothing to save for a backward
                out_TD = _fused_forward(*args, save=False)[0]
            return out_TD.to(x_TD.dtype)
        elif mode == "padded_bmm":
            assert kept is not None
            y_sorted_ND, tok_N = self._padded(
                x_TD_c, g_N1, tok_N, idx_N[order_N], kept_E, max(kept), w1, w3, w2
            )
        else:
            raise ValueError(f"dispatch: {mode!r} is not one of {', '.join(DISPATCHES)}")

        # out_t = sum_k g_tk y_tk: add each weighted row into its token's row, in expert order as the loop
        # does (dropped pairs add nothing). Its backward is one gather of the upstream gradient.
        out_TD = torch.zeros(T, self.dim, device=x_TD.device, dtype=x_TD.dtype)
        return out_TD.index_add_(0, tok_N, y_sorted_ND.to(x_TD.dtype))

    def _grouped(self, x_ND, g_N1, kept_E, w1_EFD, w3_EFD, w2_EDF) -> torch.Tensor:
        """g * expert FFN on rows sorted by expert, `kept_E` rows each, via grouped matmuls."""
        align = max(16 // x_ND.element_size(), 1)  # _grouped_mm wants 16-byte aligned strides
        x_ND = _pad_to(x_ND, 1, align)
        w1_EFD = _pad_to(_pad_to(w1_EFD, 1, align), 2, align)
        w2_EDF = _pad_to(_pad_to(w2_EDF, 1, align), 2, align)
        offs_E = torch.cumsum(kept_E, 0, dtype=torch.int32)
        h_NF = self._act_fn(torch._grouped_mm(x_ND, w1_EFD.transpose(-2, -1), offs=offs_E)) * g_N1
        if w3_EFD is not None:
            w3_EFD = _pad_to(_pad_to(w3_EFD, 1, align), 2, align)
            h_NF = h_NF * torch._grouped_mm(x_ND, w3_EFD.transpose(-2, -1), offs=offs_E)
        y_ND = torch._grouped_mm(h_NF.contiguous(), w2_EDF.transpose(-2, -1), offs=offs_E)
        return y_ND[:, : self.dim]

    def _padded(self, x_TD, g_N1, tok_N, e_N, kept_E, C, w1_EFD, w3_EFD, w2_EDF):
        """g * expert FFN via torch.bmm on an [E, C, D] buffer, C = the largest count (known on the host,
        >= 1 because N >= 1); returns its rows [E*C, D] and the token of each row.

        The buffer is gathered straight from the tokens: a padding row reads token 0 with gate 0, so its
        hidden activation, output and every gradient through it are exactly 0.
        """
        E, D = self.n_experts, self.dim
        starts_E = torch.cumsum(kept_E, 0) - kept_E
        slot_N = e_N * C + torch.arange(e_N.shape[0], device=e_N.device) - starts_E[e_N]  # row in E*C
        tok_P = tok_N.new_zeros(E * C).index_copy_(0, slot_N, tok_N)
        g_EC1 = g_N1.new_zeros(E * C, 1).index_copy(0, slot_N, g_N1).view(E, C, 1)
        x_ECD = x_TD.index_select(0, tok_P).view(E, C, D)
        h_ECF = self._act_fn(torch.bmm(x_ECD, w1_EFD.transpose(1, 2))) * g_EC1
        if w3_EFD is not None:
            h_ECF = h_ECF * torch.bmm(x_ECD, w3_EFD.transpose(1, 2))
        y_ECD = torch.bmm(h_ECF, w2_EDF.transpose(1, 2))
        return y_ECD.view(E * C, D), tok_P

    def extra_repr(self) -> str:
        cap = "" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor}"
        return (
            f"n_experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}, "
            f"dispatch={self.dispatch}{cap}"
        )


def _relu_out(pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.clamp_min(pre, 0, out=out)


# activation -> (act(pre, out=), act's backward(grad, pre, out=)), written into preallocated buffers
_ACT_OUT = {
    "swiglu": (
        lambda pre, out: torch.ops.aten.silu.out(pre, out=out),
        lambda g, pre, out: torch.ops.aten.silu_backward.grad_input(g, pre, grad_input=out),
    ),
    "gelu": (
        lambda pre, out: torch.ops.aten.gelu.out(pre, out=out),
        lambda g, pre, out: torch.ops.aten.gelu_backward.grad_input(g, pre, grad_input=out),
    ),
    "relu": (
        _relu_out,
        lambda g, pre, out: torch.ops.aten.threshold_backward.grad_input(g, pre, 0, grad_input=out),
    ),
}


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b into `out`; a plain mm under jit tracing, whose FLOP counters (fvcore) take no out=."""
    return torch.mm(a, b) if torch.jit.is_tracing() else torch.mm(a, b, out=out)


# ---- fused_loop on several threads ----------------------------------------------------------------------
# At more than one intra-op thread, the fused loop splits the experts into contiguous ranges with about equal
# rows, one per thread, and runs each range on its own Python thread with one intra-op thread. Each expert's
# matmuls (a few hundred rows) are too small for OpenMP to split well: every call would be a parallel region
# with its fork and barrier, about ten per expert, and a busy machine stalls at each. Python threads release
# the GIL inside every op, so the ranges' ops overlap. Each range writes its own partial output (summed at
# the end, in range order: deterministic) and disjoint slices of the saved pre-activations and gradients.
_OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()  # per-thread OpenMP teams
_CPU = torch.device("cpu")
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool): a forked child makes its own


def _expert_ranges(kept: list[int], device: torch.device = _CPU) -> list[tuple[int, int]]:
    """Contiguous expert ranges [lo, hi) with about equal rows, one per intra-op thread; one range where
    threads would not help or could not be used (not the CPU: a GPU's current stream is per thread; one
    thread; tracing; a dispatch or function mode such as a FLOP counter, whose state is per thread)."""
    E, total = len(kept), sum(kept)
    parts = min(torch.get_num_threads(), sum(n > 0 for n in kept))
    if (
        parts <= 1
        or device.type != "cpu"
        or not _OPENMP
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._len_torch_function_stack() > 0
    ):
        return [(0, E)]
    ranges: list[tuple[int, int]] = []
    lo, acc = 0, 0
    for e, n in enumerate(kept):
        acc += n
        if len(ranges) < parts - 1 and acc * parts >= total * (len(ranges) + 1) and e + 1 < E:
            ranges.append((lo, e + 1))
            lo = e + 1
    ranges.append((lo, E))
    return ranges


def _on_threads(fn: Callable[[int, int], torch.Tensor], ranges: list[tuple[int, int]]) -> torch.Tensor:
    """sum_r fn(*r): the first range on this thread, the others on worker threads, all with one intra-op
    thread (the count is restored after); the partial results are added in range order."""
    if len(ranges) == 1:
        return fn(*ranges[0])
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1]._max_workers < len(ranges) - 1:
        workers = max(len(ranges) - 1, os.cpu_count() or 1)
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moeforge-experts"))
    pool = _POOL[1]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def work(lo: int, hi: int) -> torch.Tensor:
        torch.set_num_threads(1)  # this thread's OpenMP team and MKL: one thread each
        with torch.inference_mode(inference), torch.set_grad_enabled(grad and not inference):
            return fn(lo, hi)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(work, lo, hi) for lo, hi in ranges[1:]]
        out = fn(*ranges[0])
        for f in futures:
            out.add_(f.result())
    finally:
        torch.set_num_threads(threads)
    return out


def _fused_forward(x_TD, g_N1, w1_EFD, w3_EFD, w2_EDF, tok_N, kept, activation, save: bool):
    """`_FusedExperts`' forward as plain ops (also what runs without autograd, so jit tracing sees the
    matmuls); `kept` is the rows per expert (host ints). Returns the output and, when `save`, the
    pre-activations [N, F or 2F] (gate in the first F columns, up in the rest)."""
    with torch.autocast(x_TD.device.type, enabled=False):  # inputs are already in the compute dtype
        T, D = x_TD.shape
        E, Fh, _ = w1_EFD.shape
        glu = w3_EFD is not None
        P = (2 if glu else 1) * Fh
        act = _ACT_OUT[activation][0]
        pre_NP = x_TD.new_empty(tok_N.shape[0], P) if save else None
        # Per-expert views made in a few calls rather than several indexing ops per expert: Python and
        # dispatcher overhead is a fixed cost per op, paid 63 times per layer here.
        toks, gs = tok_N.split(kept), g_N1.split(kept)
        pres = pre_NP.split(kept) if pre_NP is not None else None
        w1_DF, w2_FD = w1_EFD.transpose(1, 2).unbind(0), w2_EDF.transpose(1, 2).unbind(0)
        w3_DF = w3_EFD.transpose(1, 2).unbind(0) if glu else None

        def experts(lo: int, hi: int) -> torch.Tensor:
            C = max(kept[lo:hi])
            out_TD = x_TD.new_zeros(T, D)
            x_CD, y_CD, h_CF = x_TD.new_empty(C, D), x_TD.new_empty(C, D), x_TD.new_empty(C, Fh)
            scratch_CP = x_TD.new_empty(C, P) if pres is None else None
            for e in range(lo, hi):
                n = kept[e]
                if n == 0:
                    continue
                te = toks[e]
                xe = torch.index_select(x_TD, 0, te, out=x_CD[:n])
                pre = pres[e] if pres is not None else scratch_CP[:n]  # type: ignore[index]
                # gate and up straight into the two halves of pre (mm writes a row-strided output in place)
                h = act(_mm(xe, w1_DF[e], pre[:, :Fh]), h_CF[:n])
                if glu:
                    h.mul_(_mm(xe, w3_DF[e], pre[:, Fh:]))  # type: ignore[index]
                h.mul_(gs[e])
                out_TD.index_add_(0, te, _mm(h, w2_FD[e], y_CD[:n]))
            return out_TD

        out_TD = _on_threads(experts, _expert_ranges(kept, x_TD.device))
    return out_TD, pre_NP


class _FusedExperts(torch.autograd.Function):
    """Every expert's whole FFN on its sorted rows, gather to combine, in one autograd node (``fused_loop``).

    Per expert e with sorted rows s:t: gather its tokens, a = x_e W1_e^T and b = x_e W3_e^T side by side in
    one [n, 2F] buffer, h = act(a) * b * g, add h W2_e^T into the tokens' output rows. Every temporary is one
    expert's rows (about 0.5 MB here) in a buffer reused across experts, so it stays in cache; no [N, D]
    buffer exists in forward or backward. Only the pre-activations [N, F or 2F] are saved; backward regathers
    x and the upstream gradient per expert and recomputes act(a) (cheaper than storing it), and writes each
    weight's gradient straight into its slot. Matmul FLOPs are the loop's, on kept pairs only. With several
    intra-op threads the experts run as ranges on threads (`_on_threads`).
    """

    @staticmethod
    def forward(ctx, x_TD, g_N1, w1_EFD, w3_EFD, w2_EDF, tok_N, kept, activation):
        out_TD, pre_NP = _fused_forward(x_TD, g_N1, w1_EFD, w3_EFD, w2_EDF, tok_N, kept, activation, True)
        ctx.save_for_backward(x_TD, g_N1, w1_EFD, w3_EFD, w2_EDF, tok_N, pre_NP)
        ctx.kept, ctx.activation = kept, activation
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, gout_TD):
        x_TD, g_N1, w1_EFD, w3_EFD, w2_EDF, tok_N, pre_NP = ctx.saved_tensors
        kept = ctx.kept
        act, act_bwd = _ACT_OUT[ctx.activation]
        glu = w3_EFD is not None
        E, Fh, D = w1_EFD.shape
        P = pre_NP.shape[1]
        with torch.autocast(x_TD.device.type, enabled=False):
            gout_TD = gout_TD.contiguous()
            gg_N1 = torch.empty_like(g_N1)
            gw1_EFD, gw2_EDF = torch.empty_like(w1_EFD), torch.empty_like(w2_EDF)
            gw3_EFD = torch.empty_like(w3_EFD) if glu else None
            toks, gs, pres, ggs = tok_N.split(kept), g_N1.split(kept), pre_NP.split(kept), gg_N1.split(kept)
            w1s, w2s = w1_EFD.unbind(0), w2_EDF.unbind(0)
            w3s = w3_EFD.unbind(0) if glu else None
            gw1s, gw2s = gw1_EFD.unbind(0), gw2_EDF.unbind(0)
            gw3s = gw3_EFD.unbind(0) if gw3_EFD is not None else None

            def experts(lo: int, hi: int) -> torch.Tensor:
                C = max(kept[lo:hi])
                gx_TD = torch.zeros_like(x_TD)
                x_CD, gy_CD, gx_CD = (x_TD.new_empty(C, D) for _ in range(3))
                sa_CF, sb_CF, gh_CF = (x_TD.new_empty(C, Fh) for _ in range(3))
                gpre_CP = x_TD.new_empty(C, P)
                for e in range(lo, hi):
                    n = kept[e]
                    if n == 0:  # no rows: zero weight gradient
                        for gw in (gw1s, gw3s, gw2s):
                            if gw is not None:
                                gw[e].zero_()
                        continue
                    te, ge, pre = toks[e], gs[e], pres[e]
                    xe = torch.index_select(x_TD, 0, te, out=x_CD[:n])
                    gy = torch.index_select(gout_TD, 0, te, out=gy_CD[:n])  # the combine's backward: a gather
                    a = pre[:, :Fh]
                    sa = act(a, sa_CF[:n])
                    b = pre[:, Fh:]  # the up projection (empty without a GLU)
                    sb = torch.mul(sa, b, out=sb_CF[:n]) if glu else sa  # hidden activation before the gate
                    torch.mm(gy.t(), torch.mul(sb, ge, out=gh_CF[:n]), out=gw2s[e])  # h = g * sb
                    gh = torch.mm(gy, w2s[e], out=gh_CF[:n])  # dL/dh
                    prod = torch.mul(gh, sb, out=sb_CF[:n] if glu else gpre_CP[:n])  # sb is not needed again
                    torch.sum(prod, 1, keepdim=True, out=ggs[e])  # dL/dg = sum_f dL/dh * sb
                    gh.mul_(ge)  # dL/d sb
                    gpre = gpre_CP[:n]
                    ga = gpre[:, :Fh]
                    if glu:
                        gb = torch.mul(gh, sa, out=gpre[:, Fh:])  # dL/db
                        gh.mul_(b)  # dL/d act(a)
                    act_bwd(gh, a, ga)  # dL/da
                    torch.mm(ga.t(), xe, out=gw1s[e])
                    gx = torch.mm(ga, w1s[e], out=gx_CD[:n])
                    if glu:
                        assert gw3s is not None and w3s is not None
                        torch.mm(gb.t(), xe, out=gw3s[e])
                        torch.addmm(gx, gb, w3s[e], out=gx)  # aten.addmm, which FLOP counters know
                    gx_TD.index_add_(0, te, gx)
                return gx_TD

            gx_TD = _on_threads(experts, _expert_ranges(kept, x_TD.device))
        return gx_TD, gg_N1, gw1_EFD, gw3_EFD, gw2_EDF, None, None, None
