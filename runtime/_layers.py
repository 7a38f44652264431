"""The model, top-down: leaves (norms, rope, attention, FFN, MoE) -> block -> Transformer.

Legend for MoE tensors: B batch, S sequence, T = B*S tokens, D model dim, E routed experts, K routed
experts per token, G device groups, R routing groups (group-limited routing), J = E/R experts per group.

Leaf modules take plain arguments; only `moeforge.compiler.build` reads the spec. Every choice is made at build
time, so `forward` is straight-line code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._experts import Experts, count_per_expert


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    aux_loss: torch.Tensor  # scalar: sum of the balance losses (0 for a dense model)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The spec's normalization layer: RMSNorm or LayerNorm over `dim`."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


# ------------------------------------------------------------------------------------------- rope
@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (arXiv 2309.00071) with DeepSeek's mscale terms; plain numbers, read at build time."""

    factor: float
    original_max_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @staticmethod
    def _mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """Factor on cos/sin (the paper's sqrt(1/t)), as transformers computes it."""
        if self.mscale and self.mscale_all_dim:
            return self._mscale(self.factor, self.mscale) / self._mscale(self.factor, self.mscale_all_dim)
        return self._mscale(self.factor)

    @property
    def softmax_scale(self) -> float:
        """Extra factor on MLA's softmax scale (DeepSeek-V2/V3): mscale(factor, mscale_all_dim) squared."""
        return self._mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def inv_freq(self, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
        """Frequencies below the beta_slow boundary are divided by factor, above beta_fast kept, ramped between."""

        def dim_for(rotations: float) -> float:
            turns = self.original_max_positions / (rotations * 2 * math.pi)
            return head_dim * math.log(turns) / (2 * math.log(theta))

        low = max(math.floor(dim_for(self.beta_fast)), 0)
        high: float = min(math.ceil(dim_for(self.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
        i = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
        ramp = ((i - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
        return (1.0 / (self.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_cos_sin(
    seq: int, head_dim: int, theta: float, device: torch.device, yarn: Yarn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, head_dim] in the rotate-half layout (as HF transformers and Llama use)."""
    if yarn is None:
        exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
        inv_freq = 1.0 / (theta**exponent)
    else:
        inv_freq = yarn.inv_freq(head_dim, theta, device)
    angles = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [S, dh/2]
    angles = torch.cat((angles, angles), dim=-1)  # [S, dh]
    if yarn is None:
        return angles.cos(), angles.sin()
    return angles.cos() * yarn.cos_sin_scale, angles.sin() * yarn.cos_sin_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, dh] rotated by position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# -------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention with optional qkv bias, qk-norm and RoPE."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: str = "none",
        rope_theta: float | None = 10000.0,
        norm_eps: float = 1e-6,
        yarn: Yarn | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta, self.yarn = rope_theta, yarn
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        # qk-norm: per head (Qwen3) normalizes each head's vector; full (OLMoE) the whole projection.
        q_dim, k_dim = {
            "head": (head_dim, head_dim),
            "full": (n_heads * head_dim, n_kv_heads * head_dim),
        }.get(qk_norm, (0, 0))
        self.q_norm = nn.RMSNorm(q_dim, eps=norm_eps) if q_dim else None
        self.k_norm = nn.RMSNorm(k_dim, eps=norm_eps) if k_dim else None
        self.per_head_norm = qk_norm == "head"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.q_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]  # k_norm is set iff q_norm is
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, dh]
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, dh]
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]  # k_norm is set iff q_norm is
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(S, self.head_dim, self.rope_theta, x.device, self.yarn)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # [B, H, S, dh]
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, dh]
        return self.wo(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 eq. 9-19), causal.

    c_q = norm(W_qa x) and q = W_qb c_q (or q = W_q x without query compression); [c_kv, k_rope] = W_kva x;
    [k_nope, v] = W_kvb norm(c_kv) per head. RoPE rotates each query head's last qk_rope dims and the one
    k_rope shared by all heads; scores use the head width nope + rope, values have width v.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        bias: bool = False,
        latent_norm_eps: float = 1e-6,
        rope_theta: float | None = 10000.0,
        yarn: Yarn | None = None,
        rope_interleave: bool = True,
    ):
        super().__init__()
        H, qk = n_heads, qk_nope_head_dim + qk_rope_head_dim
        self.n_heads, self.v_head_dim = H, v_head_dim
        self.nope, self.rope = qk_nope_head_dim, qk_rope_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.rope_theta, self.yarn, self.rope_interleave = rope_theta, yarn, rope_interleave
        self.wq = nn.Linear(dim, H * qk, bias=False) if q_lora_rank is None else None
        self.wq_a = nn.Linear(dim, q_lora_rank, bias=bias) if q_lora_rank is not None else None
        self.q_norm = nn.RMSNorm(q_lora_rank, eps=latent_norm_eps) if q_lora_rank is not None else None
        self.wq_b = nn.Linear(q_lora_rank, H * qk, bias=False) if q_lora_rank is not None else None
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=latent_norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, H * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(H * v_head_dim, dim, bias=bias)
        self.scale = qk**-0.5 * (yarn.softmax_scale if yarn is not None else 1.0)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_interleave:
            # Pairs (x0, x1), (x2, x3), ... share a frequency: gather evens then odds and rotate halves. q and k
            # get the same permutation, so their dot products equal the interleaved rotation's.
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        H = self.n_heads
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))  # type: ignore[misc]  # [B, S, H*(n+r)]; wq_a etc. are set iff wq is not
        q = q.view(B, S, H, self.nope + self.rope).transpose(1, 2)  # [B, H, S, n+r]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)  # [B, S, c], [B, S, r]
        kv = self.wkv_b(self.kv_norm(c_kv)).view(B, S, H, self.nope + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_head_dim], dim=-1)  # [B, H, S, n], [B, H, S, v]
        k_rope = k_rope.view(B, 1, S, self.rope)  # one rotated key shared by all heads
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(S, self.rope, self.rope_theta, x.device, self.yarn)
            q_rope, k_rope = self._rotate(q_rope, cos, sin), self._rotate(k_rope, cos, sin)
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, H, S, n+r]
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope)), dim=-1)  # [B, H, S, n+r]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B, H, S, v]
        return self.wo(y.transpose(1, 2).reshape(B, S, H * self.v_head_dim))


# --------------------------------------------------------------------------------------------- ffn
class FeedForward(nn.Module):
    """SwiGLU (w2(silu(w1 x) * w3 x)) or a two-matrix GELU/ReLU FFN, without biases."""

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(hidden, dim, bias=False)
        acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "swiglu": F.silu,
            "gelu": F.gelu,
            "relu": F.relu,
        }
        self.act = acts[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


# --------------------------------------------------------------------------------------------- moe
class Router(nn.Linear):
    """The router's bias-free linear map x -> logits [T, E], always computed in fp32 (as DeepSeek-V3 does).

    Under bf16 autocast an nn.Linear would run in bf16 and round nearby logits together, which changes
    top-k choices and ties, what the selection bias decides and the balance losses; upcasting afterwards
    does not bring the lost bits back. The matmul is D x E per token, so fp32 costs next to nothing. Still
    an nn.Linear (weight [E, D]), so state dicts, initialization and accounting see the same parameter.
    """

    def __init__(self, dim: int, n_routed: int):
        super().__init__(dim, n_routed, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float())  # [T, E] fp32


class MoE(nn.Module):
    """DeepSeekMoE layer: K_s shared experts always on, plus top-K of E routed experts (arXiv 2401.06066).

    out_t = sum_i shared_i(u_t) + sum_{i in topK} g_i,t routed_i(u_t), with g the softmax scores over the
    routed experts (renormalized over the top-K if asked, times the routed scaling factor). The residual
    u_t is added by the block. Balance losses (eq. 12-17) are returned as `aux_loss`.

    Later variants, each chosen at build time: sigmoid scores with a selection bias b that only decides
    which experts are chosen (DeepSeek-V3, arXiv 2412.19437 eq. 16; `update_bias` applies its sign rule),
    group-limited routing (top-k among the best topk_group of n_group expert groups, V2 and V3), and a
    sigmoid gate on the shared expert's output (Qwen2-MoE).
    """

    load_E: torch.Tensor  # a buffer when selection_bias is on (registered in __init__)

    def __init__(
        self,
        dim: int,
        n_routed: int,
        top_k: int,
        hidden: int,
        n_shared: int = 0,
        shared_hidden: int | None = None,
        activation: str = "swiglu",
        normalize_topk: bool = False,
        routed_scaling: float = 1.0,
        expert_alpha: float = 0.0,
        per_sequence: bool = False,
        device_alpha: float = 0.0,
        device_groups: int = 1,
        capacity_factor: float | None = None,
        score: str = "softmax",
        selection_bias: bool = False,
        bias_update_speed: float = 0.0,
        bias_is_parameter: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        shared_gate: bool = False,
    ):
        super().__init__()
        self.n_routed, self.top_k = n_routed, top_k
        self.sigmoid = score == "sigmoid"
        self.n_group, self.topk_group = n_group, topk_group
        self.bias_update_speed = bias_update_speed
        if not selection_bias:
            self.selection_bias: torch.Tensor | None = None
        else:
            bias_E = torch.zeros(n_routed)
            # A parameter in DeepSeek's reference code (so counted), a buffer in transformers'. Either way the
            # sign rule moves it, never autograd.
            if bias_is_parameter:
                self.selection_bias = nn.Parameter(bias_E, requires_grad=False)
            else:
                self.register_buffer("selection_bias", bias_E)
            # Routed tokens per expert since the last `update_bias` (training only; not saved).
            self.register_buffer("load_E", torch.zeros(n_routed), persistent=False)
        self.normalize_topk, self.routed_scaling = normalize_topk, routed_scaling
        self.expert_alpha, self.per_sequence = expert_alpha, per_sequence
        self.device_alpha, self.device_groups = device_alpha, device_groups
        self.router = Router(dim, n_routed)
        self.experts = Experts(dim, hidden, n_routed, activation, capacity_factor=capacity_factor)
        # K_s shared experts of width h are one FFN of width K_s*h: sum_i W2_i f(W1_i x) = [W2_i] f([W1_i] x).
        self.shared = FeedForward(dim, n_shared * (shared_hidden or hidden), activation) if n_shared else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x.shape
        x_TD = x.reshape(B * S, D)
        logits_TE = self.router(x_TD)  # [T, E] fp32, also under autocast
        # Scores over the routed experts only: softmax (DeepSeekMoE) or one sigmoid per expert (DeepSeek-V3).
        scores_TE = logits_TE.sigmoid() if self.sigmoid else logits_TE.softmax(dim=-1)
        topk_idx_TK = self._choose(scores_TE)
        topk_w_TK = scores_TE.gather(1, topk_idx_TK)  # gate values: unbiased scores of the chosen experts
        if self.normalize_topk:
            topk_w_TK = topk_w_TK / topk_w_TK.sum(dim=-1, keepdim=True)
        topk_w_TK = topk_w_TK * self.routed_scaling
        out_TD = self.experts(x_TD, topk_idx_TK, topk_w_TK)  # capacity drops, if any, happen in there
        if self.selection_bias is not None and self.training:  # the experts counted the choices already
            assert self.experts.last_counts_E is not None  # set by the forward just run
            self.load_E += self.experts.last_counts_E.float()
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD  # Qwen2-MoE's gate
            out_TD = out_TD + shared_TD
        if self.sigmoid:  # balance losses use per-token normalized affinities (DeepSeek-V3 eq. 19-20)
            scores_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        aux = self.balance_loss(scores_TE.view(B, S, -1), topk_idx_TK.view(B, S, -1))
        return out_TD.view(B, S, D), aux

    def _choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Indices [T, K] of the chosen experts: top-k of the (biased) scores within the best groups."""
        choice_TE = scores_TE if self.selection_bias is None else scores_TE + self.selection_bias
        if self.n_group > 1:
            T, E = choice_TE.shape
            choice_TRJ = choice_TE.view(T, self.n_group, E // self.n_group)
            if self.selection_bias is None:
                group_TR = choice_TRJ.amax(dim=-1)  # DeepSeek-V2: a group's best expert
            else:
                group_TR = choice_TRJ.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of its two best
            best_idx = group_TR.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            # A tensor of ones, not a Python bool: jit tracing (fvcore's measure) has no scatter_ for a bool.
            best_TR = torch.zeros_like(group_TR, dtype=torch.bool).scatter(
                1, best_idx, torch.ones_like(best_idx, dtype=torch.bool)
            )
            choice_TE = choice_TRJ.masked_fill(~best_TR[..., None], float("-inf")).view(T, E)
        return choice_TE.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing's sign rule (DeepSeek-V3 section 2.1.2), called by the trainer after a step.

        b_i += gamma * sign(mean load - load_i) over the tokens routed since the last call, then the counts
        restart: overloaded experts become less likely to be chosen, underloaded ones more.
        """
        if self.selection_bias is None:
            return
        load_E: torch.Tensor = self.load_E
        if self.bias_update_speed:
            self.selection_bias.add_(self.bias_update_speed * torch.sign(load_E.mean() - load_E))
        load_E.zero_()

    def balance_loss(self, scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor) -> torch.Tensor:
        """Expert-level (eq. 12-14) and device-level (eq. 15-17) balance losses.

        f_i = E/(K T) * #tokens choosing i (no gradient), P_i = mean_t s_i,t; L_exp = a1 * sum_i f_i P_i.
        Device level: f'_d = mean of f_j in group d, P'_d = sum of P_j in group d; L_dev = a2 * sum_d f'_d P'_d.
        """
        zero = scores_BSE.new_zeros(())
        if self.expert_alpha == 0 and self.device_alpha == 0:
            return zero
        B, S, E = scores_BSE.shape
        K = self.top_k
        # Tokens choosing each expert, per sequence: one count over (b, e) pairs, without a host sync.
        pair_BN = topk_idx_BSK.reshape(B, S * K) + E * torch.arange(B, device=topk_idx_BSK.device)[:, None]
        counts_BE = count_per_expert(pair_BN, B * E).view(B, E).to(scores_BSE.dtype)
        loss = zero
        if self.expert_alpha:
            if self.per_sequence:
                f_BE = counts_BE * (E / (K * S))
                P_BE = scores_BSE.mean(dim=1)
                loss = loss + self.expert_alpha * (f_BE * P_BE).sum(dim=-1).mean()
            else:
                f_E = counts_BE.sum(0) * (E / (K * B * S))
                P_E = scores_BSE.reshape(B * S, E).mean(dim=0)
                loss = loss + self.expert_alpha * (f_E * P_E).sum()
        if self.device_alpha:
            G = self.device_groups
            f_E = counts_BE.sum(0) * (E / (K * B * S))
            P_E = scores_BSE.reshape(B * S, E).mean(dim=0)
            f_G = f_E.view(G, E // G).mean(dim=-1)
            P_G = P_E.view(G, E // G).sum(dim=-1)
            loss = loss + self.device_alpha * (f_G * P_G).sum()
        return loss


# ------------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm transformer block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, attention: nn.Module, ffn: nn.Module, norm_kind: str, dim: int, eps: float):
        super().__init__()
        self.attention_norm = make_norm(norm_kind, dim, eps)
        self.attention = attention
        self.ffn_norm = make_norm(norm_kind, dim, eps)
        self.ffn = ffn
        self.is_moe = isinstance(ffn, MoE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x + self.attention(self.attention_norm(x))
        if self.is_moe:
            y, aux = self.ffn(self.ffn_norm(h))
            return h + y, aux
        return h + self.ffn(self.ffn_norm(h)), None


class Transformer(nn.Module):
    """Decoder-only language model: embeddings -> blocks -> norm -> head."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        blocks: list[Block],
        norm: nn.Module,
        tie_embeddings: bool = False,
        max_positions: int | None = None,
    ):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.pos_embeddings = nn.Embedding(max_positions, dim) if max_positions else None
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        self.output = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> ModelOutput:
        B, S = input_ids.shape
        h = self.tok_embeddings(input_ids)  # [B, S, D]
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(torch.arange(S, device=input_ids.device))
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h)
            if layer_aux is not None:
                aux = aux + layer_aux
        h = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return ModelOutput(logits=F.linear(h, weight), aux_loss=aux)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, blk.ffn) for i, blk in enumerate(self.layers) if isinstance(blk.ffn, MoE)]

    @torch.no_grad()
    def update_biases(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Apply every MoE layer's selection-bias sign rule (`MoE.update_bias`); call after each optimizer step.

        `reduce` sums a tensor over the data-parallel processes in place (the trainer passes an all-reduce):
        the routed-token counts of every layer are summed in one call, so every process applies the same
        update, the one a single process would make from the whole batch.
        """
        biased = [moe for _, moe in self.moe_layers() if moe.selection_bias is not None]
        if reduce is not None and biased:
            counts = reduce(torch.cat([moe.load_E for moe in biased]))
            for moe, c in zip(biased, counts.split([moe.n_routed for moe in biased]), strict=True):
                moe.load_E.copy_(c)
        for _, moe in self.moe_layers():
            moe.update_bias()


def init_weights(model: Transformer, std: float, n_layers: int) -> None:
    """Normal(0, std) for matrices and embeddings; residual output projections scaled by 1/sqrt(2L)."""
    out_std = std / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norms keep ones, biases zeros (their defaults)
        is_out = name.endswith(("wo.weight", "w2.weight", ".experts.w2"))
        nn.init.normal_(p, mean=0.0, std=out_std if is_out else std)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
