"""Parameter, FLOP and memory accounting: pure functions of the spec (no torch).

Conventions, written down once:

Parameters
    Every weight, bias and norm gain the built model holds, counted from the spec's structure. ``total``
    counts the input embedding and the output head (unless tied), as published totals do. ``activated``
    counts what one token touches: embeddings, head, norms, attention, dense FFNs, routers, shared experts
    and top-k of the routed experts (so a routed expert counts top_k / routed_experts of its weights).
    ``non_embedding`` is total minus the input embedding, the learned position table and the output head.

FLOPs (forward, per token, at ``seq_len`` context; 2 FLOPs per multiply-add; matmuls only)
    * projections: 2 x weight parameters of q, k, v, o (biases, norms, softmax, activations not counted);
    * attention core: scores Q K^T and the value mix A V over the full sequence: 2*T*H*dh each, so
      4*T*H*dh per layer. The paper, torchtitan and FlopCounterMode count the full (non-causal) square;
      ``causal=True`` halves it as Megatron does;
    * MLA (DeepSeek-V2): 2 x weights of every projection (q or q_a/q_b, kv_a, kv_b, o); the core scores with
      the query/key head width nope + rope and mixes values of width v: 2*T*H*(nope + rope) + 2*T*H*v;
    * router: 2 x d_model x routed_experts per MoE layer (+ 2 x d_model for a shared-expert gate);
    * experts: 2 x weights of the shared experts and of top_k routed experts; dense FFN likewise;
    * output head: 2 x d_model x vocab; the embedding lookup is free.
    Training per token = 3 x forward (backward = 2 x forward: gradients for inputs and weights).
    ``six_n`` = 6 x activated non-embedding parameters, the figure many papers use instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._spec import MLASpec, ModelSpec

COMPONENTS = (
    "embedding",
    "attention",
    "dense_ffn",
    "shared_experts",
    "routed_experts",
    "router",
    "norms",
    "head",
)

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}


def _zero() -> dict[str, int]:
    return dict.fromkeys(COMPONENTS, 0)


@dataclass(frozen=True)
class LayerCounts:
    """One block's parameters (total and activated) and forward FLOPs per token, by component."""

    index: int
    kind: str  # "dense" | "moe"
    params: dict[str, int]
    activated: dict[str, int]
    forward_flops: dict[str, int]


@dataclass(frozen=True)
class Accounting:
    """Every count moeforge reports for a spec; integers are exact."""

    params: dict[str, int]  # by component, total
    activated: dict[str, int]  # by component, per token
    forward_flops: dict[str, int]  # by component, per token
    layers: list[LayerCounts] = field(repr=False)
    seq_len: int = 0
    causal: bool = False

    @property
    def params_total(self) -> int:
        return sum(self.params.values())

    @property
    def params_activated(self) -> int:
        return sum(self.activated.values())

    @property
    def params_embedding(self) -> int:
        return self.params["embedding"] + self.params["head"]

    @property
    def params_non_embedding(self) -> int:
        return self.params_total - self.params_embedding

    @property
    def params_activated_non_embedding(self) -> int:
        return self.params_activated - self.activated["embedding"] - self.activated["head"]

    @property
    def forward_flops_per_token(self) -> int:
        return sum(self.forward_flops.values())

    @property
    def train_flops_per_token(self) -> int:
        return 3 * self.forward_flops_per_token

    @property
    def train_flops_per_sequence(self) -> int:
        return self.train_flops_per_token * self.seq_len

    @property
    def six_n(self) -> int:
        """6 x activated non-embedding parameters (per token), the usual paper shorthand."""
        return 6 * self.params_activated_non_embedding


def _norm_params(spec: ModelSpec) -> int:
    return spec.d_model * (2 if spec.norm.kind == "layernorm" else 1)


def _ffn_params(spec: ModelSpec, hidden: int) -> int:
    return spec.ffn.n_matrices * spec.d_model * hidden


def _attention(spec: ModelSpec) -> tuple[int, int, int]:
    """(parameters, projection weight parameters, core FLOPs per token) of one attention block."""
    a, d, dh = spec.attention, spec.d_model, spec.head_dim
    if isinstance(a, MLASpec):
        return _mla(spec, a)
    q, kv = a.n_heads * dh, a.kv_heads * dh
    weights = d * q + 2 * d * kv + q * d
    params = weights + (q + 2 * kv if a.qkv_bias else 0) + (d if a.out_bias else 0)
    params += {"none": 0, "head": 2 * dh, "full": q + kv}[a.qk_norm]
    core = 4 * spec.seq_len * a.n_heads * dh  # Q K^T and A V, full square
    return params, weights, core


def _mla(spec: ModelSpec, a: MLASpec) -> tuple[int, int, int]:
    """MLA: q = W_qb norm(W_qa x) (or W_q x); [c_kv, k_rope] = W_kva x; [k_nope, v] = W_kvb norm(c_kv)."""
    d, H, qk, r = spec.d_model, a.n_heads, a.head_dim, a.qk_rope_head_dim
    if a.q_lora_rank is None:
        q_weights, q_extra = d * H * qk, 0
    else:
        q_weights = d * a.q_lora_rank + a.q_lora_rank * H * qk
        q_extra = a.q_lora_rank * (2 if a.bias else 1)  # latent norm (+ q_a bias)
    kv_weights = d * (a.kv_lora_rank + r) + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
    kv_extra = a.kv_lora_rank + ((a.kv_lora_rank + r) if a.bias else 0)  # latent norm (+ kv_a bias)
    o_weights = H * a.v_head_dim * d
    weights = q_weights + kv_weights + o_weights
    params = weights + q_extra + kv_extra + (d if a.bias else 0)
    core = 2 * spec.seq_len * H * qk + 2 * spec.seq_len * H * a.v_head_dim  # Q K^T, then A V
    return params, weights, core


def account(spec: ModelSpec, causal: bool = False) -> Accounting:
    """Count parameters and FLOPs of `spec` (see the module docstring for the conventions)."""
    d, V = spec.d_model, spec.vocab_size
    attn_params, attn_weights, attn_core = _attention(spec)
    if causal:
        attn_core //= 2
    moe = spec.moe_derived

    layers = []
    for i in range(spec.n_layers):
        p, a, f = _zero(), _zero(), _zero()
        p["norms"] = a["norms"] = 2 * _norm_params(spec)
        p["attention"] = a["attention"] = attn_params
        f["attention"] = 2 * attn_weights + attn_core
        if spec.is_moe_layer(i):
            assert moe is not None
            expert = _ffn_params(spec, moe.expert_hidden)
            p["router"] = a["router"] = moe.routed_experts * d
            p["shared_experts"] = a["shared_experts"] = moe.shared_experts * _ffn_params(
                spec, moe.shared_hidden
            )
            p["routed_experts"] = moe.routed_experts * expert
            a["routed_experts"] = moe.top_k * expert
            for c in ("router", "shared_experts", "routed_experts"):
                f[c] = 2 * a[c]
            gate = spec.moe.gate if spec.moe is not None else None
            if gate is not None and gate.selection_bias and gate.bias_is_parameter:
                p["router"] += moe.routed_experts  # the selection bias: added to scores, no FLOPs counted
                a["router"] += moe.routed_experts
            if spec.moe is not None and spec.moe.shared_gate:
                p["shared_experts"] += d  # the shared expert's sigmoid gate vector
                a["shared_experts"] += d
                f["shared_experts"] += 2 * d
        else:
            p["dense_ffn"] = a["dense_ffn"] = _ffn_params(spec, spec.ffn.hidden)
            f["dense_ffn"] = 2 * a["dense_ffn"]
        layers.append(LayerCounts(i, "moe" if spec.is_moe_layer(i) else "dense", p, a, f))

    params, activated, flops = _zero(), _zero(), _zero()
    for layer in layers:
        for c in COMPONENTS:
            params[c] += layer.params[c]
            activated[c] += layer.activated[c]
            flops[c] += layer.forward_flops[c]
    positions = spec.seq_len * d if spec.positions.kind == "learned" else 0
    params["embedding"] = activated["embedding"] = V * d + positions
    params["head"] = activated["head"] = 0 if spec.tie_embeddings else V * d
    params["norms"] += _norm_params(spec)  # final norm
    activated["norms"] += _norm_params(spec)
    flops["head"] = 2 * V * d  # a tied head still multiplies
    return Accounting(params, activated, flops, layers, seq_len=spec.seq_len, causal=causal)


# ---------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    train_state_bytes: int  # weights + grads + AdamW moments (+ fp32 master copy below fp32)
    activation_bytes_per_token: int


def memory(spec: ModelSpec, dtype: str = "bf16") -> MemoryEstimate:
    """Memory at `dtype`.

    Training state for AdamW with mixed precision: weights and gradients at `dtype`, two fp32 moments,
    and an fp32 master copy when `dtype` is narrower than fp32. Activations are an estimate of what
    backward keeps per token with flash attention: the inputs of every matmul and norm, the FFN hidden
    states of each activated expert, and fp32 logits.
    """
    b = DTYPE_BYTES[dtype]
    acc = account(spec)
    n = acc.params_total
    state = n * (2 * b + 8 + (4 if b < 4 else 0))
    a, d, dh = spec.attention, spec.d_model, spec.head_dim
    moe = spec.moe_derived
    nm = spec.ffn.n_matrices
    per_layer_attn = 4 * d + (2 * a.n_heads + 2 * a.kv_heads) * dh
    if isinstance(a, MLASpec):  # latents, then q, k (nope + rope) and v per head, and the attention output
        per_layer_attn = (
            4 * d + (a.q_lora_rank or 0) + a.kv_lora_rank + a.n_heads * (2 * dh + 2 * a.v_head_dim)
        )
    act = 0
    for i in range(spec.n_layers):
        act += per_layer_attn
        if spec.is_moe_layer(i):
            assert moe is not None
            act += d + moe.routed_experts  # router input and scores
            act += moe.top_k * (d + nm * moe.expert_hidden) + moe.shared_experts * nm * moe.shared_hidden
        else:
            act += nm * spec.ffn.hidden
    act_bytes = act * b + (d * b + 4 * spec.vocab_size)
    return MemoryEstimate(n * b, state, act_bytes)
