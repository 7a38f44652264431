"""Accounting invariants on drawn specs: counts equal the built model's numel, and the conventions hold."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from moeforge.compiler import COMPONENTS, ModelSpec, account, build
from moeforge.compiler._spec import MLASpec
from spec_strategies import model_specs

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def attention_core(spec: ModelSpec) -> int:
    """Q K^T and A V of one layer per token over the full square: 2*S*H*d_qk + 2*S*H*d_v."""
    a = spec.attention
    d_v = a.v_head_dim if isinstance(a, MLASpec) else spec.head_dim
    return 2 * spec.seq_len * a.n_heads * (spec.head_dim + d_v)


def meta_numel(spec: ModelSpec) -> int:
    return sum(p.numel() for p in build(spec, device="meta").parameters())


@SETTINGS
@given(model_specs(max_heads=8, head_dims=(2, 4, 8, 16, 32), max_layers=5, max_hidden=256, max_experts=16))
def test_params_equal_meta_numel(spec: ModelSpec) -> None:
    assert account(spec).params_total == meta_numel(spec)


def _component_numel(spec: ModelSpec) -> dict[str, int]:
    """The built model's parameters grouped by the module that owns them (not by name matching)."""
    from moeforge.runtime import MoE
    from torch.nn import Parameter

    model = build(spec, device="meta")
    out = dict.fromkeys(COMPONENTS, 0)

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    out["embedding"] = n(model.tok_embeddings) + n(model.pos_embeddings)
    out["head"] = n(model.output)
    out["norms"] = n(model.norm)
    for block in model.layers:
        out["norms"] += n(block.attention_norm) + n(block.ffn_norm)
        out["attention"] += n(block.attention)
        if isinstance(block.ffn, MoE):
            # The selection bias is the MoE module's own parameter (DeepSeek-V3 keeps it by the router's
            # weight) and counts as the router's; the shared experts' gate counts as theirs.
            bias = block.ffn.selection_bias
            out["router"] += n(block.ffn.router) + (bias.numel() if isinstance(bias, Parameter) else 0)
            out["routed_experts"] += n(block.ffn.experts)
            out["shared_experts"] += n(block.ffn.shared) + n(block.ffn.shared_gate)
        else:
            out["dense_ffn"] += n(block.ffn)
    return out


@SETTINGS
@given(model_specs())
def test_components_match_the_modules_that_own_them(spec: ModelSpec) -> None:
    # qk-norm gains live in the attention module and the accounting counts them there.
    assert account(spec).params == _component_numel(spec)


@SETTINGS
@given(model_specs(max_layers=6))
def test_totals_are_sums_of_components_and_layers(spec: ModelSpec) -> None:
    acc = account(spec)
    assert acc.params_total == sum(acc.params.values())
    assert acc.params_activated == sum(acc.activated.values())
    assert acc.forward_flops_per_token == sum(acc.forward_flops.values())
    # Per-layer counts plus what lives outside the blocks (embeddings, head, final norm) give the totals.
    outside = {"embedding", "head"}
    final_norm = spec.d_model * (2 if spec.norm.kind == "layernorm" else 1)
    for c in COMPONENTS:
        in_layers = sum(lc.params[c] for lc in acc.layers)
        if c in outside:
            assert in_layers == 0
        elif c == "norms":
            assert in_layers + final_norm == acc.params[c]
        else:
            assert in_layers == acc.params[c]
            assert sum(lc.activated[c] for lc in acc.layers) == acc.activated[c]
            assert sum(lc.forward_flops[c] for lc in acc.layers) == acc.forward_flops[c]
    for c in COMPONENTS:
        assert 0 <= acc.activated[c] <= acc.params[c]
    assert acc.params_activated <= acc.params_total
    assert acc.params_non_embedding + acc.params_embedding == acc.params_total
    moe_layers = [lc.index for lc in acc.layers if lc.kind == "moe"]
    assert tuple(moe_layers) == spec.moe_layers


@SETTINGS
@given(model_specs(max_layers=4))
def test_flop_conventions(spec: ModelSpec) -> None:
    acc = account(spec)
    assert acc.train_flops_per_token == 3 * acc.forward_flops_per_token
    assert acc.train_flops_per_sequence == acc.train_flops_per_token * spec.seq_len
    # Every counted FLOP except the attention core is 2 x an activated weight (the head always multiplies).
    core = attention_core(spec) * spec.n_layers
    d, V = spec.d_model, spec.vocab_size
    a = spec.attention
    if isinstance(a, MLASpec):  # q (direct or through its latent), kv_a, kv_b, o
        H, qk, v = a.n_heads, a.head_dim, a.v_head_dim
        q = d * H * qk if a.q_lora_rank is None else d * a.q_lora_rank + a.q_lora_rank * H * qk
        kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (a.qk_nope_head_dim + v)
        attn_weights = spec.n_layers * (q + kv + H * v * d)
    else:
        attn_weights = spec.n_layers * (
            2 * d * a.n_heads * spec.head_dim + 2 * d * a.kv_heads * spec.head_dim
        )
    assert acc.forward_flops["attention"] == 2 * attn_weights + core
    assert acc.forward_flops["head"] == 2 * V * d
    for c in ("dense_ffn", "shared_experts", "routed_experts"):
        assert acc.forward_flops[c] == 2 * acc.activated[c]
    # The selection bias is a parameter the router holds, added to the scores: no multiply-add.
    d_moe, gate = spec.moe_derived, spec.moe.gate if spec.moe is not None else None
    counted = d_moe is not None and gate is not None and gate.selection_bias and gate.bias_is_parameter
    bias = len(spec.moe_layers) * d_moe.routed_experts if counted and d_moe is not None else 0
    assert acc.forward_flops["router"] == 2 * (acc.activated["router"] - bias)
    assert acc.forward_flops["embedding"] == acc.forward_flops["norms"] == 0


@SETTINGS
@given(model_specs(max_layers=4))
def test_causal_halves_exactly_the_attention_core(spec: ModelSpec) -> None:
    full, causal = account(spec), account(spec, causal=True)
    core = attention_core(spec)  # per layer, full square
    assert causal.causal and not full.causal
    assert full.forward_flops["attention"] - causal.forward_flops["attention"] == spec.n_layers * core // 2
    for c in COMPONENTS:
        if c != "attention":
            assert full.forward_flops[c] == causal.forward_flops[c]
    assert full.params == causal.params and full.activated == causal.activated


@SETTINGS
@given(model_specs(moe=True))
def test_routed_experts_activate_top_k_of_their_weights(spec: ModelSpec) -> None:
    acc = account(spec)
    d = spec.moe_derived
    assert d is not None
    # routed_experts * activated == top_k * total, layer by layer (both exact integers)
    for lc in acc.layers:
        assert lc.activated["routed_experts"] * d.routed_experts == lc.params["routed_experts"] * d.top_k
    # a dense spec with the same attention counts the same attention and embeddings
    dense = account(spec.model_copy(update={"moe": None}))
    for c in ("embedding", "attention", "head"):
        assert dense.params[c] == acc.params[c]


@pytest.mark.parametrize("tie", [False, True])
def test_tied_head_is_not_counted_twice_but_still_multiplies(tie: bool) -> None:
    spec = ModelSpec.model_validate(
        {
            "vocab_size": 100,
            "d_model": 16,
            "n_layers": 1,
            "seq_len": 8,
            "tie_embeddings": tie,
            "attention": {"kind": "mha", "n_heads": 2},
            "ffn": {"hidden": 32},
        }
    )
    acc = account(spec)
    assert acc.params["head"] == (0 if tie else 100 * 16)
    assert acc.forward_flops["head"] == 2 * 100 * 16
    assert acc.params_total == meta_numel(spec)
