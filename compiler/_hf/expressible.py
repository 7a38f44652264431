"""Which stock transformers format computes exactly what a spec describes: the rules per family, and the
one line (the feature, and the nearest exportable change) when none does. Only the computed function
matters; what a family's config cannot hold travels in the MARKER key (see `export`)."""

from __future__ import annotations

from .._spec import MLASpec, ModelSpec, RopeSpec
from .formats import DENSE, EXPORT_ORDER, FAMILIES, HFError


def _not_any_family(spec: ModelSpec) -> str | None:
    """What no family expresses, with the nearest exportable change; None when some family might."""
    a, moe = spec.attention, spec.moe
    kind = "MoE" if moe is not None else "dense"
    if spec.norm.kind != "rmsnorm":
        return f"norm.kind: layernorm is in no stock {kind} class; use norm.kind: rmsnorm"
    if not isinstance(spec.positions, RopeSpec):
        return f"positions.kind: {spec.positions.kind} is in no stock {kind} class; use positions.kind: rope"
    if spec.positions.yarn is not None and not isinstance(a, MLASpec):
        return "positions.yarn: only exported with MLA (DeepSeek-V2/V3); drop positions.yarn"
    if spec.ffn.activation != "swiglu":
        what = "experts are" if moe is not None else "FFNs are"
        return (
            f"ffn.activation: {spec.ffn.activation} {what} in no stock {kind} class (all use SwiGLU); "
            "use ffn.activation: swiglu"
        )
    if moe is None:
        if isinstance(a, MLASpec):
            return "attention.kind: mla is in no stock dense class; use attention.kind: gqa"
        if a.qk_norm == "full":
            return (
                "attention.qk_norm: full (over the whole projection) is in no stock pre-norm dense class; "
                "use qk_norm: head (qwen3) or none (llama)"
            )
        return None
    if moe.capacity_factor is not None:
        return "moe.capacity_factor: transformers' MoE layers are dropless; drop moe.capacity_factor"
    return None


def _expressible(spec: ModelSpec, family: str) -> str | None:
    """None when `family`'s transformers model computes exactly `spec`; else the first reason it does not.

    Only the computed function matters: balance-loss settings a family's config cannot hold travel in the
    MARKER key, as do shared experts concatenated into qwen2_moe's single shared MLP.
    """
    reason = _not_any_family(spec)
    if reason:
        return reason
    if family in DENSE:
        return _dense_expressible(spec, family)
    a, moe, d = spec.attention, spec.moe, spec.moe_derived
    if moe is None or d is None:
        return f"moe: a dense spec is not an MoE model; {family} is one (dense formats: {', '.join(DENSE)})"
    g = moe.gate
    mla = isinstance(a, MLASpec)
    if mla != (family in ("deepseek_v2", "deepseek_v3")):
        return "attention.kind: mla is DeepSeek-V2/V3's" if mla else f"attention.kind: {family} uses MLA"
    if family == "glm4_moe":
        return _glm4_expressible(spec)
    if not mla and a.qk_norm != {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"):
        return f"attention.qk_norm: {a.qk_norm} is not {family}'s"
    if moe.shared_gate and family != "qwen2_moe":
        return "moe.shared_gate: only qwen2_moe gates its shared expert"
    if (g.score == "sigmoid" or g.selection_bias) != (family == "deepseek_v3"):
        return (
            "moe.gate.score/selection_bias: sigmoid scores with a selection bias are deepseek_v3's (MLA) "
            "and glm4_moe's (MHA/GQA)"
        )
    if g.score == "sigmoid" and not g.selection_bias:
        return "moe.gate.selection_bias: deepseek_v3 always has one"
    if g.n_group > 1 and family not in ("deepseek_v2", "deepseek_v3"):
        return "moe.gate.n_group: group-limited routing is DeepSeek-V2/V3's (and glm4_moe's, with sigmoid scores)"
    if g.routed_scaling != 1 and family not in ("deepseek_v2", "deepseek_v3"):
        return (
            "moe.gate.routed_scaling: only DeepSeek-V2/V3 (and glm4_moe, with sigmoid scores) scale the "
            "routed experts"
        )
    moe_layers = set(spec.moe_layers)
    if family in ("deepseek_v2", "deepseek_v3"):
        k = min(moe_layers)
        if moe_layers != set(range(k, spec.n_layers)):
            return (
                "moe.layers: transformers' DeepSeek-V2/V3 make every layer from first_k_dense_replace on MoE"
            )
    if family in ("mixtral", "olmoe") and len(moe_layers) != spec.n_layers:
        return f"moe.first_dense: {family} has no dense layers"
    if family == "deepseek":
        k = min(moe_layers)
        freq = 1 if len(moe_layers) < 2 else sorted(moe_layers)[1] - k
        if moe_layers != {i for i in range(spec.n_layers) if i >= k and i % freq == 0}:
            return (
                "moe.layers: not of DeepSeek's form (i >= first_k_dense_replace and i % moe_layer_freq == 0)"
            )
    # qwen2_moe/qwen3_moe: any layer set (mlp_only_layers lists the dense ones)
    if family == "deepseek_v2" and g.normalize_topk:
        return "moe.gate.normalize_topk: transformers' deepseek_v2 ignores norm_topk_prob"
    if family == "mixtral" and not g.normalize_topk:
        return "moe.gate.normalize_topk: mixtral always renormalizes the top-k"
    if family in ("qwen3_moe", "mixtral", "olmoe") and d.shared_experts:
        return f"moe.shared_experts: {family} has none"
    if family.startswith("deepseek") and d.shared_experts and d.shared_hidden != d.expert_hidden:
        return "moe.shared_hidden: DeepSeek's shared experts have the routed experts' width"
    if family == "deepseek_v3" and not d.shared_experts:
        return "moe.shared_experts: transformers' deepseek_v3 always has shared experts"
    if isinstance(a, MLASpec):
        if a.latent_norm_eps != 1e-6:
            return "attention.latent_norm_eps: transformers uses 1e-6"
        if family == "deepseek_v2" and not a.rope_interleave:
            return "attention.rope_interleave: deepseek_v2 always rotates interleaved pairs"
    else:
        if family in ("mixtral",) and (a.qkv_bias or a.out_bias):
            return "attention.qkv_bias: mixtral has no attention biases"
        if family == "qwen2_moe" and a.out_bias:
            return "attention.out_bias: qwen2_moe has biases on q, k, v only"
        if family in ("deepseek", "qwen3_moe", "olmoe") and a.qkv_bias != a.out_bias:
            return (
                f"attention.out_bias: {family}'s attention_bias puts a bias on all four projections or none"
            )
        if family == "olmoe" and spec.head_dim * a.n_heads != spec.d_model:
            return "attention.head_dim: olmoe's heads split d_model"
    return None


def _glm4_expressible(spec: ModelSpec) -> str | None:
    """glm4_moe (transformers' Glm4MoeForCausalLM), read in modeling_glm4_moe.py: q/k/v biases on or off
    together and none on o_proj; optional per-head qk RMSNorm with rms_norm_eps; RoPE over the whole head with
    partial_rotary_factor 1 (written; the config's default is 0.5); routing always sigmoid scores plus
    e_score_correction_bias to choose, groups ranked by the sum of their two best biased scores, gate values the
    unbiased scores, renormalized if norm_topk_prob (a 1e-20 added to the sum, below fp32 resolution), times
    routed_scaling_factor; one shared MLP of n_shared_experts x moe_intermediate_size, ungated; MoE from layer
    first_k_dense_replace on."""
    a, moe, d = spec.attention, spec.moe, spec.moe_derived
    assert moe is not None and d is not None and not isinstance(a, MLASpec)
    g = moe.gate
    if g.score != "sigmoid":
        return "moe.gate.score: glm4_moe scores experts with a sigmoid; use moe.gate.score: sigmoid"
    if g.n_group > 1 and not g.selection_bias:
        return (
            "moe.gate.selection_bias: glm4_moe ranks expert groups by their two best biased scores, moeforge "
            "without a bias by the best one; set moe.gate.selection_bias: true"
        )
    if d.routed_experts // g.n_group < 2:
        return (
            "moe.gate.n_group: glm4_moe sums each group's two best scores; use >= 2 routed experts per group"
        )
    if a.qk_norm == "full":
        return "attention.qk_norm: full is not glm4_moe's (use_qk_norm is per head); use qk_norm: head"
    if a.out_bias:
        return "attention.out_bias: glm4_moe has biases on q, k, v only; use out_bias: false"
    if moe.shared_gate:
        return "moe.shared_gate: glm4_moe's shared experts are ungated; use shared_gate: false"
    if d.shared_experts and d.shared_hidden != d.expert_hidden:
        return (
            "moe.shared_hidden: glm4_moe's shared experts have the routed experts' width; drop shared_hidden"
        )
    layers = spec.moe_layers
    if not layers or list(layers) != list(range(layers[0], spec.n_layers)):
        return "moe.layers: glm4_moe makes every layer from first_k_dense_replace on MoE; use moe.first_dense"
    return None


def _dense_expressible(spec: ModelSpec, family: str) -> str | None:
    """llama: biases on all four projections or none, no qk-norm; qwen2: biases on q, k, v only; qwen3: per-head
    qk RMSNorm (rms_norm_eps), biases on all four or none. All: SwiGLU (mlp_bias false), RMSNorm, full RoPE."""
    a = spec.attention
    if spec.moe is not None:
        return f"moe: {family} is a dense format; drop the moe section"
    assert not isinstance(a, MLASpec)
    if a.qk_norm != ("head" if family == "qwen3" else "none"):
        return f"attention.qk_norm: {a.qk_norm} is not {family}'s"
    if family == "qwen2" and (not a.qkv_bias or a.out_bias):
        return "attention.qkv_bias: qwen2 always has biases on q, k, v and none on o"
    if family != "qwen2" and a.qkv_bias != a.out_bias:
        return f"attention.out_bias: {family}'s attention_bias puts a bias on all four projections or none"
    return None


def _nearest(spec: ModelSpec, reasons: dict[str, str | None]) -> str:
    """The one line to print when no stock format expresses `spec`: the feature, and the nearest change."""
    common = _not_any_family(spec)
    if common:
        return common
    # the family closest in kind: MLA -> DeepSeek-V3/V2; sigmoid/bias without MLA -> glm4_moe; shared experts
    # -> qwen2_moe; dense -> llama, qwen2 or qwen3 by their attention
    a, moe = spec.attention, spec.moe
    if moe is None:
        assert not isinstance(a, MLASpec)
        near = "qwen3" if a.qk_norm == "head" else "qwen2" if a.qkv_bias and not a.out_bias else "llama"
    elif isinstance(a, MLASpec):
        near = "deepseek_v3" if moe.gate.score == "sigmoid" else "deepseek_v2"
    elif moe.gate.score == "sigmoid" or moe.gate.selection_bias:
        near = "glm4_moe"
    elif moe.gate.normalize_topk and not (spec.moe_derived and spec.moe_derived.shared_experts):
        near = "qwen3_moe" if a.qk_norm == "head" else "olmoe" if a.qk_norm == "full" else "mixtral"
    else:
        near = "qwen2_moe"
    return f"{reasons[near]} (nearest stock format: {near}; change that field to export)"


def choose_format(spec: ModelSpec, fmt: str | None = None) -> str:
    """The model_type `spec` exports as: `fmt` when given (and exact), else the first of EXPORT_ORDER.

    "auto" (or None) never picks a remote-code format; ``deepseek`` is written only when named.

    Raises:
        HFError: no stock format (or not the one asked for) computes what the spec describes; the message
            names the feature and the nearest exportable change.
    """
    if fmt not in (None, "auto"):
        if fmt not in FAMILIES:
            raise HFError(f"format: {fmt!r} is not one of auto, {', '.join(FAMILIES)}")
        reason = _expressible(spec, fmt)
        if reason:
            raise HFError(f"{reason} (exporting to {fmt})")
        return fmt
    reasons = {f: _expressible(spec, f) for f in EXPORT_ORDER}
    found = next((f for f, r in reasons.items() if r is None), None)
    if found is None:
        raise HFError(f"no stock transformers class expresses this spec: {_nearest(spec, reasons)}")
    return found


__all__ = ["choose_format"]
