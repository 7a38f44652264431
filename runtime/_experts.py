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
* ``loop``: `forward_loop`, the plain per-expert loop: obviously right, slow, and the test oracle.
* ``auto``: ``grouped_mm`` where a tiny probe (once per device type and dtype) shows it works forward and
  backward, else ``padded_bmm``.

Optional capacity (GShard / Switch Transformer baselines): each expert keeps its first
ceil(capacity_factor * T * K / E) pairs in token order; the rest contribute 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Dispatch = Literal["auto", "grouped_mm", "padded_bmm", "loop"]
DISPATCHES: tuple[str, ...] = ("auto", "grouped_mm", "padded_bmm", "loop")

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here (probed once per device type, dtype)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm") or device.type == "meta":
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            x = torch.randn(6, 16, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(3, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([2, 2, 6], device=device, dtype=torch.int32)  # includes an empty group
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.backward(torch.randn_like(y))
            ref = x[2:].detach() @ w[2].detach().t()
            return bool(torch.allclose(y[2:].detach().float(), ref.float(), rtol=5e-2, atol=5e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


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
        if torch.compiler.is_compiling() and device.type == "cpu" and dtype != torch.bfloat16:
            return "padded_bmm"  # inductor lowers _grouped_mm on CPU for bf16 only
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
        counts_E = torch.bincount(idx_N, minlength=E)
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
        if cap is None:
            kept_E = counts_E
            self.last_dropped_fraction = torch.zeros((), device=x_TD.device)
        else:
            kept_E = counts_E.clamp(max=cap)
            self.last_dropped_fraction = ((counts_E - kept_E).sum() / max(T * K, 1)).float().detach()
            if mode != "loop":
                starts_E = torch.cumsum(counts_E, 0) - counts_E
                rank_N = torch.arange(T * K, device=idx_N.device) - starts_E[idx_N[order_N]]
                order_N = order_N[rank_N < cap]  # still sorted by expert, now <= cap per expert

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
        elif mode == "padded_bmm":
            y_sorted_ND, tok_N = self._padded(x_TD_c, g_N1, tok_N, idx_N[order_N], kept_E, w1, w3, w2)
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

    def _padded(self, x_TD, g_N1, tok_N, e_N, kept_E, w1_EFD, w3_EFD, w2_EDF):
        """g * expert FFN via torch.bmm on an [E, C, D] buffer, C = the largest count; returns its rows
        [E*C, D] and the token of each row.

        The buffer is gathered straight from the tokens: a padding row reads token 0 with gate 0, so its
        hidden activation, output and every gradient through it are exactly 0.
        """
        E, D = self.n_experts, self.dim
        C = int(kept_E.max())  # one host sync; C >= 1 because N >= 1
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


def init_std_scaled(std: float, n_layers: int) -> float:
    """Std for residual output projections (GPT-2 style 1/sqrt(2L) scaling)."""
    return std / math.sqrt(2 * n_layers)
