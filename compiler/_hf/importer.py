"""config.json -> ModelSpec. Import reads every key of a config: a key either maps to a spec field, is known to
carry no architecture (token ids, dtype, bookkeeping), is checked to hold the one value moeforge builds
(``attention_dropout: 0``), or is an error naming it; nothing is dropped silently."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from .._spec import ModelSpec
from .formats import FAMILIES, MARKER, HFError, round_coefficient

# transformers' defaults where a config leaves a key out.
_EPS = {"mixtral": 1e-5, "olmoe": 1e-5, "glm4_moe": 1e-5}
_THETA = {"mixtral": 1e6}
_HEAD_DIM = {"qwen3": 128}
_PARTIAL_ROTARY = {"glm4_moe": 0.5}  # the share of each head RoPE rotates; moeforge rotates all of it

# Keys with no bearing on the computed function: token ids, storage dtype, library bookkeeping.
_NO_ARCHITECTURE = {
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "_name_or_path",
    "output_router_logits",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
    "ep_size",
    "qk_head_dim",
    "_attn_implementation_autoset",
}


class _Config:
    """A config dict that remembers which keys were read, so leftovers can be reported by name."""

    def __init__(self, data: dict[str, Any], family: str):
        self.data, self.family = data, family
        self.used: set[str] = set(_NO_ARCHITECTURE)
        self.notes: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def first(self, *keys: str) -> Any:
        """The first of several spellings (transformers' attribute_map aliases) that is set."""
        self.used.update(keys)
        return next((self.data[k] for k in keys if self.data.get(k) is not None), None)

    def req(self, key: str) -> Any:
        self.used.add(key)
        if self.data.get(key) is None:
            raise HFError(f"{key}: missing from the {self.family} config")
        return self.data[key]

    def only(self, key: str, allowed: tuple[Any, ...], why: str) -> None:
        """The key may be absent or hold one of `allowed` (what moeforge builds); else it is an error."""
        value = self.get(key)
        if value is not None and value not in allowed:
            raise HFError(f"{key}: {value!r} cannot be expressed by moeforge ({why})")

    def note(self, key: str, why: str) -> None:
        self.used.add(key)
        if key in self.data:
            self.notes.append(f"{key}: {self.data[key]!r} not imported ({why})")

    def check_all_used(self) -> None:
        left = [k for k in self.data if k not in self.used]
        if left:
            raise HFError(
                f"{', '.join(left)}: moeforge cannot express {'this field' if len(left) == 1 else 'these fields'} "
                f"of a {self.family} config"
            )


def _rope(c: _Config) -> dict[str, Any]:
    params = c.get("rope_parameters", {}) or {}
    theta = params.get("rope_theta", c.get("rope_theta", _THETA.get(c.family, 10000.0)))
    c.used.add("rope_theta")
    partial = params.get(
        "partial_rotary_factor", c.get("partial_rotary_factor", _PARTIAL_ROTARY.get(c.family, 1.0))
    )
    if partial != 1:
        raise HFError(
            f"partial_rotary_factor: {partial!r} cannot be expressed by moeforge (RoPE rotates whole heads)"
        )
    scaling = c.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    out: dict[str, Any] = {"kind": "rope", "theta": float(theta)}
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind != "yarn":
            raise HFError(f"rope_scaling.type: {kind!r} cannot be expressed by moeforge (only yarn)")
        if scaling.get("truncate", True) is not True or scaling.get("attention_factor") is not None:
            raise HFError("rope_scaling: truncate/attention_factor cannot be expressed by moeforge")
        known = {
            "type",
            "rope_type",
            "rope_theta",
            "factor",
            "original_max_position_embeddings",
            "partial_rotary_factor",
        }
        known |= {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor"}
        extra = [k for k in scaling if k not in known]
        if extra:
            raise HFError(f"rope_scaling.{extra[0]}: cannot be expressed by moeforge")
        yarn = {
            "factor": float(scaling["factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
        for key, default in (
            ("beta_fast", 32.0),
            ("beta_slow", 1.0),
            ("mscale", 1.0),
            ("mscale_all_dim", 0.0),
        ):
            yarn[key] = float(scaling.get(key) or default)
        out["yarn"] = yarn
    return out


def _common(c: _Config) -> dict[str, Any]:
    c.only("hidden_act", ("silu",), "experts and FFNs are SwiGLU")
    c.only("attention_dropout", (0, 0.0), "no attention dropout")
    c.only("pretraining_tp", (1,), "tensor-parallel pretraining slices are not modelled")
    c.only("use_sliding_window", (False,), "full causal attention only")
    c.only("mlp_bias", (False,), "FFNs and experts have no biases")
    layer_types = c.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise HFError("layer_types: only full_attention layers can be expressed by moeforge")
    return {
        "vocab_size": c.req("vocab_size"),
        "d_model": c.req("hidden_size"),
        "n_layers": c.req("num_hidden_layers"),
        "seq_len": c.get("max_position_embeddings", 4096),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "init_std": float(c.get("initializer_range", 0.02)),
        "norm": {"kind": "rmsnorm", "eps": float(c.get("rms_norm_eps", _EPS.get(c.family, 1e-6)))},
        "positions": _rope(c),
    }


def _mha(c: _Config, qkv_bias: bool, out_bias: bool, qk_norm: str = "none") -> dict[str, Any]:
    heads = c.req("num_attention_heads")
    kv = c.get("num_key_value_heads", heads)
    att: dict[str, Any] = {"kind": "mha" if kv == heads else "gqa", "n_heads": heads}
    if kv != heads:
        att["n_kv_heads"] = kv
    head_dim = c.get("head_dim", _HEAD_DIM.get(c.family))
    if head_dim is not None and head_dim != c.req("hidden_size") // heads:
        att["head_dim"] = head_dim
    att.update(qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm)
    return att


def _deepseek(c: _Config) -> dict[str, Any]:
    spec = _common(c)
    f = c.family
    if f == "deepseek":
        bias = bool(c.get("attention_bias", False))
        spec["attention"] = _mha(c, bias, bias)
    else:
        heads = c.req("num_attention_heads")
        c.only("num_key_value_heads", (heads,), "MLA has one latent shared by all heads")
        c.used.add("head_dim")  # transformers sets it to qk_rope_head_dim
        spec["attention"] = {
            "kind": "mla",
            "n_heads": heads,
            "q_lora_rank": c.get("q_lora_rank"),
            "kv_lora_rank": c.req("kv_lora_rank"),
            "qk_nope_head_dim": c.req("qk_nope_head_dim"),
            "qk_rope_head_dim": c.req("qk_rope_head_dim"),
            "v_head_dim": c.req("v_head_dim"),
            "bias": bool(c.get("attention_bias", False)),
            "rope_interleave": bool(c.get("rope_interleave", True)) if f == "deepseek_v3" else True,
        }
    spec["ffn"] = {"activation": "swiglu", "hidden": c.req("intermediate_size")}
    routed = c.first("n_routed_experts", "num_local_experts", "num_experts")
    if routed is None:
        return spec
    n_layers, k, freq = spec["n_layers"], c.get("first_k_dense_replace", 0), c.get("moe_layer_freq", 1)
    # DeepSeek's rule: MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0
    moe: dict[str, Any] = _layers_form([i for i in range(n_layers) if i >= k and i % freq == 0], n_layers)
    moe.update(
        routed_experts=routed,
        shared_experts=c.get("n_shared_experts", 0),
        top_k=c.req("num_experts_per_tok"),
        expert_hidden=c.req("moe_intermediate_size"),
    )
    scoring = c.get("scoring_func", "sigmoid" if f == "deepseek_v3" else "softmax")
    method = c.get("topk_method", "noaux_tc" if f == "deepseek_v3" else "greedy")
    if (f, method) not in {
        ("deepseek", "greedy"),
        ("deepseek_v2", "greedy"),
        ("deepseek_v2", "group_limited_greedy"),
        ("deepseek_v3", "noaux_tc"),
    }:
        raise HFError(f"topk_method: {method!r} cannot be expressed by moeforge for {f}")
    if scoring not in ("softmax", "sigmoid") or (f == "deepseek_v3") != (scoring == "sigmoid"):
        raise HFError(f"scoring_func: {scoring!r} cannot be expressed by moeforge for {f}")
    gate: dict[str, Any] = {
        "score": scoring,
        "normalize_topk": bool(c.get("norm_topk_prob", False)),
        "routed_scaling": float(c.get("routed_scaling_factor", 1.0)),
    }
    n_group, topk_group = c.get("n_group", 1), c.get("topk_group", 1)
    if method == "noaux_tc":
        gate.update(selection_bias=True, bias_update_speed=float(c.get("bias_update_speed", 0.0)))
        gate["bias_is_parameter"] = bool(c.get("selection_bias_is_parameter", True))
    if method != "greedy":
        gate.update(n_group=n_group, topk_group=topk_group)
    moe["gate"] = gate
    moe["balance"] = {
        "expert_alpha": float(c.get("aux_loss_alpha", 0.0)),
        "per_sequence": bool(c.get("seq_aux", False)),
    }
    spec["moe"] = moe
    c.note(
        "num_nextn_predict_layers",
        "multi-token-prediction modules are not part of transformers' model either",
    )
    c.note("num_mtp_layers", "multi-token-prediction modules are not part of transformers' model either")
    c.note("quantization_config", "a storage format; the spec describes the model")
    return spec


def _sparse_layers(c: _Config, n_layers: int) -> dict[str, Any]:
    step, only_mlp = c.get("decoder_sparse_step", 1), list(c.get("mlp_only_layers", []) or [])
    layers = [i for i in range(n_layers) if i not in only_mlp and (i + 1) % step == 0]
    return _layers_form(layers, n_layers)


def _layers_form(layers: list[int], n_layers: int) -> dict[str, Any]:
    """The spec's own form of a set of MoE layers: first_dense when they are a suffix, else an explicit list."""
    if layers and layers == list(range(layers[0], n_layers)):
        return {"first_dense": layers[0]} if layers[0] else {}
    return {"layers": layers}


def _aux(c: _Config, top_k: int) -> dict[str, Any]:
    # transformers' load_balancing_loss_func = coef * E * sum_i (count_i / T) P_i = coef * K * DeepSeekMoE's sum_i f_i P_i
    return {"expert_alpha": round_coefficient(float(c.get("router_aux_loss_coef", 0.0)) * top_k)}


def _qwen(c: _Config) -> dict[str, Any]:
    spec = _common(c)
    qwen2 = c.family == "qwen2_moe"
    if qwen2:
        spec["attention"] = _mha(c, bool(c.get("qkv_bias", True)), False)
    else:
        bias = bool(c.get("attention_bias", False))
        spec["attention"] = _mha(c, bias, bias, "head")
    c.used |= {"sliding_window", "max_window_layers"}  # only used with use_sliding_window (checked false)
    spec["ffn"] = {"activation": "swiglu", "hidden": c.req("intermediate_size")}
    top_k = c.req("num_experts_per_tok")
    moe: dict[str, Any] = _sparse_layers(c, spec["n_layers"])
    routed = c.first("num_experts", "num_local_experts")
    if routed is None:
        raise HFError(f"num_experts: missing from the {c.family} config")
    moe.update(routed_experts=routed, top_k=top_k, expert_hidden=c.req("moe_intermediate_size"))
    if qwen2:
        shared = c.req("shared_expert_intermediate_size")
        marker = c.get(MARKER, {}) or {}
        n_shared = int(marker.get("shared_experts", 1 if shared else 0))
        if n_shared and shared % n_shared:
            raise HFError(
                f"{MARKER}.shared_experts: {n_shared} does not divide shared_expert_intermediate_size"
            )
        moe.update(shared_experts=n_shared, shared_gate=bool(marker.get("shared_gate", True)))
        if n_shared and shared // n_shared != moe["expert_hidden"]:
            moe["shared_hidden"] = shared // n_shared
    moe["gate"] = {"normalize_topk": bool(c.get("norm_topk_prob", False))}
    moe["balance"] = _aux(c, top_k)
    spec["moe"] = moe
    return spec


def _mixtral_olmoe(c: _Config) -> dict[str, Any]:
    spec = _common(c)
    if c.family == "mixtral":
        spec["attention"] = _mha(c, False, False)
        c.only("router_jitter_noise", (0, 0.0), "no router input jitter")
        c.only("sliding_window", (None,), "full causal attention only")
        normalize = (
            True  # softmax over all experts, then renormalized over the top-k == softmax of the top-k logits
        )
    else:
        bias = bool(c.get("attention_bias", False))
        spec["attention"] = _mha(c, bias, bias, "full")
        c.only("clip_qkv", (None,), "no clipping of q, k, v")
        normalize = bool(c.get("norm_topk_prob", False))
    hidden = c.req("intermediate_size")
    top_k = c.req("num_experts_per_tok")
    routed = c.first("num_local_experts", "num_experts")
    if routed is None:
        raise HFError(f"num_local_experts: missing from the {c.family} config")
    spec["ffn"] = {"activation": "swiglu", "hidden": hidden}  # no dense layer; the expert width
    spec["moe"] = {
        "routed_experts": routed,
        "top_k": top_k,
        "expert_hidden": hidden,
        "gate": {"normalize_topk": normalize},
        "balance": _aux(c, top_k),
    }
    return spec


def _glm4(c: _Config) -> dict[str, Any]:
    """GLM-4.5's glm4_moe: DeepSeek-V3's routing (sigmoid, selection bias, groups) with GQA attention."""
    spec = _common(c)
    qk_norm = "head" if c.get("use_qk_norm", False) else "none"
    spec["attention"] = _mha(c, bool(c.get("attention_bias", False)), False, qk_norm)  # o_proj has none
    spec["ffn"] = {"activation": "swiglu", "hidden": c.req("intermediate_size")}
    n_layers = spec["n_layers"]
    first = min(int(c.get("first_k_dense_replace", 1)), n_layers)
    moe: dict[str, Any] = _layers_form(list(range(first, n_layers)), n_layers)
    routed = c.first("n_routed_experts", "num_local_experts")
    if routed is None:
        raise HFError("n_routed_experts: missing from the glm4_moe config")
    moe.update(
        routed_experts=routed,
        shared_experts=c.get("n_shared_experts", 1),
        top_k=c.req("num_experts_per_tok"),
        expert_hidden=c.req("moe_intermediate_size"),
    )
    moe["gate"] = {
        "score": "sigmoid",
        "selection_bias": True,  # e_score_correction_bias; the MARKER says when the spec has none
        "normalize_topk": bool(c.get("norm_topk_prob", True)),
        "routed_scaling": float(c.get("routed_scaling_factor", 1.0)),
        "n_group": c.get("n_group", 1),
        "topk_group": c.get("topk_group", 1),
    }
    spec["moe"] = moe
    c.note(
        "num_nextn_predict_layers", "multi-token-prediction modules are not part of the model moeforge builds"
    )
    c.note("num_mtp_layers", "multi-token-prediction modules are not part of the model moeforge builds")
    return spec


def _dense(c: _Config) -> dict[str, Any]:
    """llama, qwen2 (bias on q, k, v only) and qwen3 (per-head qk-norm): dense SwiGLU decoders."""
    spec = _common(c)
    if c.family == "qwen2":
        spec["attention"] = _mha(c, True, False)
    else:
        bias = bool(c.get("attention_bias", False))
        spec["attention"] = _mha(c, bias, bias, "head" if c.family == "qwen3" else "none")
    if c.family != "llama":
        c.used |= {"sliding_window", "max_window_layers"}  # only used with use_sliding_window (checked false)
    spec["ffn"] = {"activation": "swiglu", "hidden": c.req("intermediate_size")}
    return spec


_IMPORTERS: dict[str, Callable[[_Config], dict[str, Any]]] = {
    "deepseek": _deepseek,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "qwen2_moe": _qwen,
    "qwen3_moe": _qwen,
    "mixtral": _mixtral_olmoe,
    "olmoe": _mixtral_olmoe,
    "glm4_moe": _glm4,
    "llama": _dense,
    "qwen2": _dense,
    "qwen3": _dense,
}


def config_to_spec(config: Mapping[str, Any], name: str | None = None) -> tuple[ModelSpec, list[str]]:
    """A Hugging Face config (the dict of config.json) as a validated spec, with notes on ignored fields.

    Raises:
        HFError: an unsupported model_type, or a field moeforge cannot express (named in the message).
    """
    family = config.get("model_type")
    if family not in _IMPORTERS:
        raise HFError(f"model_type: {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    c = _Config(dict(config), family)
    data = _IMPORTERS[family](c)
    marker = c.get(MARKER, {}) or {}
    unknown = set(marker) - {"shared_experts", "shared_gate", "balance", "ffn_hidden", "gate"}
    if (
        unknown
        or (family != "qwen2_moe" and {"shared_experts", "shared_gate"} & set(marker))
        or (family != "glm4_moe" and "gate" in marker)
        or ("moe" not in data and marker)
        or set(marker.get("gate", {})) - {"selection_bias", "bias_update_speed", "bias_is_parameter"}
    ):
        raise HFError(f"{MARKER}: {sorted(marker)} cannot be expressed by moeforge for {family}")
    if "ffn_hidden" in marker:
        data["ffn"]["hidden"] = int(marker["ffn_hidden"])
    if "gate" in marker:
        gate = data["moe"]["gate"] = {**data["moe"]["gate"], **marker["gate"]}
        if not gate["selection_bias"] and gate["n_group"] > 1:
            # glm4_moe ranks groups by their two best scores, moeforge without a bias by the best one
            raise HFError(
                f"{MARKER}.gate.selection_bias: false cannot be expressed with n_group > 1 for {family}"
            )
    if "balance" in marker and "moe" in data:
        data["moe"]["balance"] = {**data["moe"].get("balance", {}), **marker["balance"]}
    c.check_all_used()
    data = {"name": name or family, **data}
    try:
        return ModelSpec.model_validate(data), c.notes
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise HFError(f"{where or 'config'}: {err['msg']} (from the {family} config)") from None


__all__ = ["config_to_spec"]
