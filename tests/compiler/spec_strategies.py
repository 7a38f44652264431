"""Hypothesis strategies for valid model specs (dense and MoE, every variant the schema offers: MHA, GQA and
MLA attention; softmax or sigmoid scores, the selection bias, group-limited routing, the shared-expert gate).

Specs are drawn as plain YAML-shaped dicts and validated by `ModelSpec`, so a draw the validator rejects
is a failure (either the strategy or the validator is wrong), not a silent skip.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from moeforge.compiler import ModelSpec


@st.composite
def spec_dicts(
    draw: st.DrawFn,
    *,
    max_heads: int = 4,
    head_dims: tuple[int, ...] = (2, 4, 8, 16),
    max_layers: int = 3,
    max_hidden: int = 64,
    max_experts: int = 8,
    max_seq: int = 32,
    max_vocab: int = 300,
    moe: bool | None = None,
) -> dict[str, Any]:
    n_heads = draw(st.integers(1, max_heads))
    head_dim = draw(st.sampled_from(head_dims))
    positions = draw(st.sampled_from(["rope", "learned", "none"]))
    kind = draw(st.sampled_from(["mha", "gqa", "mla"]))
    if kind == "mla":
        attention = draw(_mla(n_heads, head_dims, rope=positions == "rope"))
        d_model = draw(st.sampled_from([4, 8, 12, 16, 24, 32, 48, 64]))
    else:
        attention = {
            "kind": kind,
            "n_heads": n_heads,
            "qkv_bias": draw(st.booleans()),
            "out_bias": draw(st.booleans()),
            "qk_norm": draw(st.sampled_from(["none", "head", "full"])),
        }
        if kind == "gqa":
            attention["n_kv_heads"] = draw(
                st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0])
            )
        if draw(st.booleans()):  # d_model = n_heads * head_dim, head_dim implied
            d_model = n_heads * head_dim
        else:  # an explicit head_dim, independent of d_model
            d_model = draw(st.sampled_from([4, 8, 12, 16, 24, 32, 48, 64]))
            attention["head_dim"] = head_dim
    activation = draw(st.sampled_from(["swiglu", "gelu", "relu"]))
    n_layers = draw(st.integers(1, max_layers))
    spec: dict[str, Any] = {
        "name": "drawn",
        "vocab_size": draw(st.integers(2, max_vocab)),
        "d_model": d_model,
        "n_layers": n_layers,
        "seq_len": draw(st.integers(1, max_seq)),
        "tie_embeddings": draw(st.booleans()),
        "norm": {"kind": draw(st.sampled_from(["rmsnorm", "layernorm"]))},
        "positions": {"kind": positions},
    }
    if positions == "rope" and draw(st.booleans()):  # DeepSeek-V2/V3's YaRN context extension
        spec["positions"]["yarn"] = {
            "factor": draw(st.sampled_from([2.0, 40.0])),
            "original_max_position_embeddings": draw(st.integers(1, max_seq)),
            "mscale_all_dim": draw(st.sampled_from([0.0, 1.0])),
        }
    spec |= {
        "attention": attention,
        "ffn": {"activation": activation, "hidden": draw(st.integers(1, max_hidden))},
    }
    if moe is None:
        moe = draw(st.booleans())
    if moe:
        spec["moe"] = draw(_moe(spec, n_layers, max_hidden, max_experts))
    return spec


@st.composite
def _mla(draw: st.DrawFn, n_heads: int, head_dims: tuple[int, ...], *, rope: bool) -> dict[str, Any]:
    """DeepSeek-V2's multi-head latent attention, with or without the query compression (V2-Lite)."""
    widths = st.sampled_from(head_dims)
    rope_widths = st.sampled_from([w for w in head_dims if w % 2 == 0]) if rope else widths
    return {
        "kind": "mla",
        "n_heads": n_heads,
        "q_lora_rank": draw(st.none() | st.integers(1, 16)),
        "kv_lora_rank": draw(st.integers(1, 16)),
        "qk_nope_head_dim": draw(widths),
        "qk_rope_head_dim": draw(rope_widths),
        "v_head_dim": draw(widths),
        "bias": draw(st.booleans()),
        "rope_interleave": draw(st.booleans()),
    }


@st.composite
def _moe(
    draw: st.DrawFn, spec: dict[str, Any], n_layers: int, max_hidden: int, max_experts: int
) -> dict[str, Any]:
    moe: dict[str, Any] = {}
    placement = draw(st.sampled_from(["all", "first_dense", "explicit"]))
    if placement == "first_dense":
        moe["first_dense"] = draw(st.integers(0, n_layers - 1))
        moe["every"] = draw(st.integers(1, 2))
    elif placement == "explicit":
        layers = draw(st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=n_layers, unique=True))
        moe["layers"] = layers
    if draw(st.booleans()):  # paper form: N experts of standard width, top-K, segmentation m, K_s shared
        m = draw(st.sampled_from([1, 2, 4]))
        standard = m * draw(st.integers(1, max(max_hidden // m, 1)))
        if draw(st.booleans()):
            spec["ffn"]["hidden"] = standard
        else:
            moe_standard = standard
            moe.setdefault("paper", {})["standard_hidden"] = moe_standard
        n = draw(st.integers(1, max(max_experts // m, 1)))
        k = draw(st.integers(1, n))
        paper = moe.setdefault("paper", {})
        shared = draw(st.integers(0, m * k - 1))
        paper.update(experts=n, top_k=k, m=m, shared=shared)
        routed, top_k = m * n - shared, m * k - shared
    else:
        routed = draw(st.integers(1, max_experts))
        top_k = draw(st.integers(1, routed))
        shared = draw(st.integers(0, 2))
        moe.update(routed_experts=routed, top_k=top_k, shared_experts=shared)
        moe["expert_hidden"] = draw(st.integers(1, max_hidden))
        if draw(st.booleans()):
            moe["shared_hidden"] = draw(st.integers(1, max_hidden))
    moe["gate"] = draw(_gate(routed, top_k))
    if shared and draw(st.booleans()):
        moe["shared_gate"] = True  # Qwen2-MoE's sigmoid gate on the shared experts
    moe["balance"] = {"expert_alpha": draw(st.sampled_from([0.0, 0.01])), "per_sequence": draw(st.booleans())}
    moe["capacity_factor"] = draw(st.sampled_from([None, 1.0]))
    return moe


@st.composite
def _gate(draw: st.DrawFn, routed: int, top_k: int) -> dict[str, Any]:
    """Softmax or sigmoid scores, DeepSeek-V3's selection bias, DeepSeek-V2/V3's group-limited routing."""
    gate: dict[str, Any] = {
        "score": draw(st.sampled_from(["softmax", "sigmoid"])),
        "normalize_topk": draw(st.booleans()),
        "routed_scaling": draw(st.sampled_from([1.0, 2.5])),
        "selection_bias": draw(st.booleans()),
    }
    if gate["selection_bias"]:
        gate["bias_is_parameter"] = draw(st.booleans())
        gate["bias_update_speed"] = draw(st.sampled_from([0.0, 0.001]))
    # n_group divides the routed experts (at least two per group for the biased group score, the sum of
    # a group's two best); topk_group groups hold at least top_k experts.
    per_group_min = 2 if gate["selection_bias"] else 1
    n_group = draw(
        st.sampled_from(
            [g for g in range(1, routed + 1) if routed % g == 0 and routed // g >= per_group_min] or [1]
        )
    )
    gate["n_group"] = n_group
    gate["topk_group"] = draw(
        st.sampled_from([r for r in range(1, n_group + 1) if r * (routed // n_group) >= top_k])
    )
    return gate


def model_specs(**kwargs: Any) -> st.SearchStrategy[ModelSpec]:
    """Validated specs; `kwargs` bound the sizes (see `spec_dicts`)."""
    return spec_dicts(**kwargs).map(ModelSpec.model_validate)
