"""ModelSpec -> config.json of the format `choose_format` picks (or the one asked for)."""

from __future__ import annotations

from typing import Any

from .._spec import MLASpec, ModelSpec, RopeSpec
from .expressible import choose_format
from .formats import ARCHITECTURES, DENSE, MARKER, round_coefficient


def _layer_config(spec: ModelSpec, family: str) -> dict[str, Any]:
    moe_layers = spec.moe_layers
    if family in ("qwen2_moe", "qwen3_moe"):
        return {
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(spec.n_layers) if i not in moe_layers],
        }
    if family.startswith("deepseek"):
        k = min(moe_layers)
        freq = 1 if len(moe_layers) < 2 else sorted(moe_layers)[1] - k
        return {"first_k_dense_replace": k, "moe_layer_freq": freq}
    if family == "glm4_moe":
        return {"first_k_dense_replace": min(moe_layers)}
    return {}


def _marker(spec: ModelSpec, family: str) -> dict[str, Any]:
    """What the family's config cannot hold but import needs back (see MARKER); {} when nothing."""
    moe, d = spec.moe, spec.moe_derived
    out: dict[str, Any] = {}
    if moe is None or d is None:
        return out
    if family == "qwen2_moe" and (d.shared_experts != 1 or not moe.shared_gate):
        out.update(shared_experts=d.shared_experts, shared_gate=moe.shared_gate)
    if family in ("mixtral", "olmoe") and spec.ffn.hidden != d.expert_hidden:
        # no dense layer there, but the spec's standard width (the paper form refers to it)
        out["ffn_hidden"] = spec.ffn.hidden
    g, b = moe.gate, moe.balance
    if family == "glm4_moe":  # its config always has a selection bias (a buffer) and no training keys
        gate: dict[str, Any] = {}
        if not g.selection_bias:
            gate["selection_bias"] = False  # exported as a zero bias
        if g.bias_update_speed:
            gate["bias_update_speed"] = g.bias_update_speed
        if not g.bias_is_parameter:
            gate["bias_is_parameter"] = False
        if gate:
            out["gate"] = gate
    balance: dict[str, Any] = {}
    if family == "glm4_moe" and b.expert_alpha:
        balance["expert_alpha"] = b.expert_alpha
    if b.per_sequence and not family.startswith("deepseek"):
        balance["per_sequence"] = True
    if b.device_alpha:
        balance.update(device_alpha=b.device_alpha, device_groups=b.device_groups)
    if balance:
        out["balance"] = balance
    return out


def spec_to_config(spec: ModelSpec, family: str | None = None) -> dict[str, Any]:
    """A config.json dict for `spec`: of `family`, or of the first stock family that expresses it exactly.

    Raises:
        HFError: no family (or not the one asked for) computes what the spec describes.
    """
    family = choose_format(spec, family)
    a, moe, d = spec.attention, spec.moe, spec.moe_derived
    assert isinstance(spec.positions, RopeSpec)
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.kv_heads,
        "max_position_embeddings": spec.seq_len,
        "rms_norm_eps": spec.norm.eps,
        "rope_theta": spec.positions.theta,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_embeddings,
        "initializer_range": spec.init_std,
        "attention_dropout": 0.0,
    }
    y = spec.positions.yarn
    if y is not None:
        cfg["rope_scaling"] = {"type": "yarn", **y.model_dump()}
    if isinstance(a, MLASpec):
        cfg.update(
            q_lora_rank=a.q_lora_rank,
            kv_lora_rank=a.kv_lora_rank,
            qk_nope_head_dim=a.qk_nope_head_dim,
            qk_rope_head_dim=a.qk_rope_head_dim,
            v_head_dim=a.v_head_dim,
            attention_bias=a.bias,
        )
        if family == "deepseek_v3":
            cfg["rope_interleave"] = a.rope_interleave
    else:
        # always for glm4_moe and the dense formats (qwen3 defaults head_dim to 128, not d_model / n_heads)
        if (
            spec.head_dim * a.n_heads != spec.d_model
            or a.head_dim is not None
            or family in (*DENSE, "glm4_moe")
        ):
            cfg["head_dim"] = spec.head_dim
        if family == "qwen2_moe":
            cfg["qkv_bias"] = a.qkv_bias
        elif family not in ("mixtral", "qwen2"):
            cfg["attention_bias"] = a.qkv_bias
    if moe is None or d is None:  # a dense format (choose_format checked which)
        cfg.update(intermediate_size=spec.ffn.hidden)
        if family == "llama":
            cfg["mlp_bias"] = False
        else:
            cfg["use_sliding_window"] = False
        return cfg
    g, b = moe.gate, moe.balance
    cfg.update(_layer_config(spec, family))
    if family == "glm4_moe":
        cfg.update(
            intermediate_size=spec.ffn.hidden,
            moe_intermediate_size=d.expert_hidden,
            n_routed_experts=d.routed_experts,
            n_shared_experts=d.shared_experts,  # 0: a zero-width shared MLP, which adds nothing
            num_experts_per_tok=d.top_k,
            norm_topk_prob=g.normalize_topk,
            routed_scaling_factor=g.routed_scaling,
            n_group=g.n_group,
            topk_group=g.topk_group,
            use_qk_norm=a.qk_norm == "head",
            partial_rotary_factor=1.0,  # the config's default is 0.5
            num_nextn_predict_layers=0,  # no multi-token-prediction modules
        )
    elif family.startswith("deepseek"):
        cfg.update(
            intermediate_size=spec.ffn.hidden,
            moe_intermediate_size=d.expert_hidden,
            n_routed_experts=d.routed_experts,
            n_shared_experts=d.shared_experts,
            num_experts_per_tok=d.top_k,
            norm_topk_prob=g.normalize_topk,
            scoring_func=g.score,
            aux_loss_alpha=b.expert_alpha,
            seq_aux=b.per_sequence,
        )
        if family != "deepseek":
            cfg["routed_scaling_factor"] = g.routed_scaling
            cfg["n_group"], cfg["topk_group"] = g.n_group, g.topk_group
        if family == "deepseek_v2":
            cfg["topk_method"] = "group_limited_greedy" if g.n_group > 1 else "greedy"
        if family == "deepseek_v3":
            cfg["topk_method"] = "noaux_tc"
            cfg["bias_update_speed"] = g.bias_update_speed
            cfg["selection_bias_is_parameter"] = g.bias_is_parameter
    else:
        aux = round_coefficient(b.expert_alpha / d.top_k)
        cfg.update(num_experts_per_tok=d.top_k, router_aux_loss_coef=aux)
        if family in ("qwen2_moe", "qwen3_moe"):
            cfg.update(
                intermediate_size=spec.ffn.hidden,
                moe_intermediate_size=d.expert_hidden,
                num_experts=d.routed_experts,
                norm_topk_prob=g.normalize_topk,
                use_sliding_window=False,
            )
            if family == "qwen2_moe":  # the K_s shared experts as one MLP of K_s x their width
                cfg["shared_expert_intermediate_size"] = d.shared_experts * d.shared_hidden
        elif family == "mixtral":
            cfg.update(
                intermediate_size=d.expert_hidden, num_local_experts=d.routed_experts, sliding_window=None
            )
        else:  # olmoe
            cfg.update(
                intermediate_size=d.expert_hidden,
                num_experts=d.routed_experts,
                norm_topk_prob=g.normalize_topk,
            )
    marker = _marker(spec, family)
    if marker:
        cfg[MARKER] = marker
    return cfg


def family_of(spec: ModelSpec) -> str:
    """The family `spec_to_config` exports `spec` as (`--format auto`)."""
    return choose_format(spec)


__all__ = ["family_of", "spec_to_config"]
