"""Hypothesis strategies for valid model specs (dense and MoE, every variant the schema offers).

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
    attention: dict[str, Any] = {
        "n_heads": n_heads,
        "qkv_bias": draw(st.booleans()),
        "out_bias": draw(st.booleans()),
        "qk_norm": draw(st.sampled_from(["none", "head", "full"])),
    }
    if draw(st.booleans()):
        attention["kind"] = "mha"
    else:
        attention["kind"] = "gqa"
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
        "attention": attention,
        "ffn": {"activation": activation, "hidden": draw(st.integers(1, max_hidden))},
    }
    if moe is None:
        moe = draw(st.booleans())
    if moe:
        spec["moe"] = draw(_moe(spec, n_layers, max_hidden, max_experts))
    return spec


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
        paper.update(experts=n, top_k=k, m=m, shared=draw(st.integers(0, m * k - 1)))
    else:
        routed = draw(st.integers(1, max_experts))
        moe["routed_experts"] = routed
        moe["top_k"] = draw(st.integers(1, routed))
        moe["shared_experts"] = draw(st.integers(0, 2))
        moe["expert_hidden"] = draw(st.integers(1, max_hidden))
        if draw(st.booleans()):
            moe["shared_hidden"] = draw(st.integers(1, max_hidden))
    moe["gate"] = {"normalize_topk": draw(st.booleans()), "routed_scaling": draw(st.sampled_from([1.0, 2.5]))}
    moe["balance"] = {"expert_alpha": draw(st.sampled_from([0.0, 0.01])), "per_sequence": draw(st.booleans())}
    moe["capacity_factor"] = draw(st.sampled_from([None, 1.0]))
    return moe


def model_specs(**kwargs: Any) -> st.SearchStrategy[ModelSpec]:
    """Validated specs; `kwargs` bound the sizes (see `spec_dicts`)."""
    return spec_dicts(**kwargs).map(ModelSpec.model_validate)
