"""Hugging Face interop: config.json <-> ModelSpec, and safetensors weights <-> our state_dict.

Supported ``model_type``s: deepseek (DeepSeekMoE 16B's remote-code config), deepseek_v2, deepseek_v3, glm4_moe,
qwen2_moe, qwen3_moe, mixtral, olmoe, and for dense specs llama, qwen2, qwen3. Import reads every key of a
config: a key either maps to a spec field, is known to carry no architecture (token ids, dtype, bookkeeping),
is checked to hold the one value moeforge builds (``attention_dropout: 0``), or is an error naming it; nothing
is dropped silently. Export picks the first
family whose transformers implementation computes exactly what the spec describes (or the one asked for)
and refuses, naming the field, when none does.

Weights travel in the Hub's per-expert layout (``mlp.experts.{e}.gate_proj.weight``; Mixtral's
``block_sparse_moe.experts.{e}.w1.weight``), which transformers 5 also writes; its fused in-memory layout
(``mlp.experts.gate_up_proj``) is read too. Mapping to ours: gate_proj/w1 -> w1, up_proj/w3 -> w3,
down_proj/w2 -> w2, stacked over experts; the attention and norms map one to one.

transformers is not needed here: it is imported only by `check_against_transformers` (export's --check).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ._spec import MLASpec, ModelSpec, RopeSpec

FAMILIES = (
    "deepseek",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "llama",
    "qwen2",
    "qwen3",
)
# Dense (no moe section) formats; every other format is an MoE one.
DENSE = ("llama", "qwen2", "qwen3")
# `--format auto` tries these in order and takes the first that expresses the spec exactly: each is a stock
# transformers class (no remote code). Families that compute the spec with no added parameter come first;
# qwen2_moe, whose shared-expert gate moeforge may have to pin at zero, is the last MoE one. glm4_moe takes
# only sigmoid-scored specs without MLA and the dense formats only dense specs, which no other format
# expresses, so adding them changed no earlier choice.
EXPORT_ORDER = (
    "deepseek_v3",
    "deepseek_v2",
    "glm4_moe",
    "qwen3_moe",
    "olmoe",
    "mixtral",
    "qwen2_moe",
    "llama",
    "qwen2",
    "qwen3",
)
# Formats whose class lives in the model repo, not in transformers: written only when asked for by name.
REMOTE_CODE = ("deepseek",)
# The config key that carries what a stock config cannot say but the spec does (import reads it back):
# how many shared experts were concatenated into one shared MLP, whether qwen2_moe's shared gate is a
# pinned zero, glm4_moe's selection-bias settings (its config always has a bias and no training keys), and
# balance-loss settings of training that the family's config has no key for.
MARKER = "moeforge"
ARCHITECTURES = {
    "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
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


class HFError(ValueError):
    """A config, checkpoint or spec the other side cannot express; the message names the field."""


# ------------------------------------------------------------------------------------------- reading
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


def _round(x: float) -> float:
    """Keep 12 significant digits: coefficient arithmetic (alpha = coef * K) must round-trip exactly."""
    return float(f"{x:.12g}")


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
    return {"expert_alpha": _round(float(c.get("router_aux_loss_coef", 0.0)) * top_k)}


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


# ------------------------------------------------------------------------------------------- writing
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
        aux = _round(b.expert_alpha / d.top_k)
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


# ------------------------------------------------------------------------------------------- weights
def _names(family: str) -> dict[str, Any]:
    if family == "mixtral":
        return {"moe": "block_sparse_moe", "experts": ("w1", "w3", "w2"), "shared": None}
    shared = "shared_expert" if family == "qwen2_moe" else "shared_experts"
    return {"moe": "mlp", "experts": ("gate_proj", "up_proj", "down_proj"), "shared": shared}


def _pairs(spec: ModelSpec, family: str) -> list[tuple[str, str]]:
    """(our key, HF key) for every tensor that maps one to one (experts are stacked separately)."""
    n = _names(family)
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not spec.tie_embeddings:
        pairs.append(("output.weight", "lm_head.weight"))
    a, moe = spec.attention, spec.moe
    for i in range(spec.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(o + "attention_norm.weight", h + "input_layernorm.weight")]
        pairs += [(o + "ffn_norm.weight", h + "post_attention_layernorm.weight")]
        if isinstance(a, MLASpec):
            mods = [
                ("wkv_a", "kv_a_proj_with_mqa", a.bias),
                ("wkv_b", "kv_b_proj", False),
                ("wo", "o_proj", a.bias),
            ]
            norms = [("kv_norm", "kv_a_layernorm")]
            if a.q_lora_rank is None:
                mods.append(("wq", "q_proj", False))
            else:
                mods += [("wq_a", "q_a_proj", a.bias), ("wq_b", "q_b_proj", False)]
                norms.append(("q_norm", "q_a_layernorm"))
        else:
            mods = [
                (ours, theirs, a.qkv_bias)
                for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"))
            ]
            mods.append(("wo", "o_proj", a.out_bias))
            norms = [("q_norm", "q_norm"), ("k_norm", "k_norm")] if a.qk_norm != "none" else []
        for ours, theirs, bias in mods:
            pairs.append((f"{o}attention.{ours}.weight", f"{h}self_attn.{theirs}.weight"))
            if bias:
                pairs.append((f"{o}attention.{ours}.bias", f"{h}self_attn.{theirs}.bias"))
        for ours, theirs in norms:
            pairs.append((f"{o}attention.{ours}.weight", f"{h}self_attn.{theirs}.weight"))
        if not spec.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                pairs.append((f"{o}ffn.{ours}.weight", f"{h}mlp.{theirs}.weight"))
            continue
        assert moe is not None
        m = f"{h}{n['moe']}."
        pairs.append((f"{o}ffn.router.weight", m + "gate.weight"))
        if moe.gate.selection_bias:
            pairs.append((f"{o}ffn.selection_bias", m + "gate.e_score_correction_bias"))
        if n["shared"] and (spec.moe_derived and spec.moe_derived.shared_experts):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                pairs.append((f"{o}ffn.shared.{ours}.weight", f"{m}{n['shared']}.{theirs}.weight"))
        if moe.shared_gate:
            pairs.append((f"{o}ffn.shared_gate.weight", m + "shared_expert_gate.weight"))
    return pairs


_IGNORED_WEIGHTS = re.compile(r"rotary_emb\.inv_freq$")


def _pinned_gate(spec: ModelSpec, family: str) -> bool:
    """qwen2_moe for a spec without a shared gate: its gate weight is pinned at 0, so sigmoid(0) = 0.5
    scales the shared MLP, whose down projection is stored doubled to cancel it. Both factors are powers
    of two, so the products are exact in every float format."""
    return family == "qwen2_moe" and spec.moe is not None and not spec.moe.shared_gate


def _zero_fillers(spec: ModelSpec, family: str) -> dict[str, tuple[int, ...]]:
    """HF tensors a format always has but the spec does not: written as zeros (or empty), checked on import.

    glm4_moe always has e_score_correction_bias (a zero bias chooses as no bias does) and a shared MLP of
    n_shared_experts x moe_intermediate_size (zero width when the spec has no shared expert).
    """
    moe, d = spec.moe, spec.moe_derived
    if family != "glm4_moe" or moe is None or d is None:
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for i in spec.moe_layers:
        m = f"model.layers.{i}.mlp."
        if not moe.gate.selection_bias:
            out[m + "gate.e_score_correction_bias"] = (d.routed_experts,)
        if not d.shared_experts:
            out[m + "shared_experts.gate_proj.weight"] = (0, spec.d_model)
            out[m + "shared_experts.up_proj.weight"] = (0, spec.d_model)
            out[m + "shared_experts.down_proj.weight"] = (spec.d_model, 0)
    return out


def added_parameters(spec: ModelSpec, family: str) -> dict[str, int]:
    """Parameters transformers counts for the exported model beyond moeforge's total (negative: fewer).

    qwen2_moe's pinned shared gate adds d_model per MoE layer; deepseek_v3 holds the selection bias as a
    buffer, so num_parameters() leaves out the routed-expert count per MoE layer that moeforge counts
    (with gate.bias_is_parameter, DeepSeek's reference convention).
    """
    out: dict[str, int] = {}
    n_moe = len(spec.moe_layers)
    if _pinned_gate(spec, family):
        out["shared_expert_gate (pinned at 0)"] = spec.d_model * n_moe
    moe, d = spec.moe, spec.moe_derived
    if moe is not None and d is not None and moe.gate.selection_bias and moe.gate.bias_is_parameter:
        out["e_score_correction_bias (a buffer there)"] = -d.routed_experts * n_moe
    return out


def hf_to_state_dict(spec: ModelSpec, family: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Our state_dict (keys and shapes of `moeforge.compiler.build(spec)`) from HF checkpoint tensors.

    `tensors` maps HF names to tensors (a dict, or a lazy mapping over safetensors files).

    Raises:
        HFError: a tensor is missing, has the wrong shape downstream, or is left over (named).
    """
    import torch

    out: dict[str, Any] = {}
    used: set[str] = set()

    def take(key: str) -> Any:
        if key not in tensors:
            raise HFError(f"{key}: missing from the checkpoint")
        used.add(key)
        return tensors[key]

    for ours, theirs in _pairs(spec, family):
        out[ours] = take(theirs)
    for key in _zero_fillers(spec, family):
        if take(key).count_nonzero():
            raise HFError(f"{key}: not zero, but the spec has no such tensor ({MARKER} in config.json)")
    d = spec.moe_derived
    n = _names(family)
    if _pinned_gate(spec, family):
        for i in spec.moe_layers:
            m = f"model.layers.{i}.mlp."
            if take(m + "shared_expert_gate.weight").count_nonzero():
                raise HFError(
                    f"{m}shared_expert_gate.weight: not zero, but the config's {MARKER}.shared_gate is false"
                )
            if d is not None and d.shared_experts:
                key = f"layers.{i}.ffn.shared.w2.weight"
                out[key] = out[key] / 2  # stored doubled to cancel sigmoid(0) = 0.5
            else:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    if take(f"{m}shared_expert.{proj}.weight").numel():
                        raise HFError(f"{m}shared_expert.{proj}.weight: not empty, but the spec has none")
    for i in spec.moe_layers:
        assert d is not None
        m = f"model.layers.{i}.{n['moe']}.experts."
        fused = f"model.layers.{i}.mlp.experts."
        if fused + "gate_up_proj" in tensors:  # transformers 5's in-memory layout: [E, 2F, D] and [E, D, F]
            w1, w3 = take(fused + "gate_up_proj").chunk(2, dim=1)
            out[f"layers.{i}.ffn.experts.w1"], out[f"layers.{i}.ffn.experts.w3"] = (
                w1.contiguous(),
                w3.contiguous(),
            )
            out[f"layers.{i}.ffn.experts.w2"] = take(fused + "down_proj")
            continue
        for ours, theirs in zip(("w1", "w3", "w2"), n["experts"], strict=True):
            out[f"layers.{i}.ffn.experts.{ours}"] = torch.stack(
                [take(f"{m}{e}.{theirs}.weight") for e in range(d.routed_experts)]
            )
    left = [k for k in tensors if k not in used and not _IGNORED_WEIGHTS.search(k)]
    if spec.tie_embeddings:
        left = [k for k in left if k != "lm_head.weight"]
    beyond = [
        k
        for k in left
        if (hit := re.match(r"model\.layers\.(\d+)\.", k)) and int(hit.group(1)) >= spec.n_layers
    ]
    left = [
        k for k in left if k not in beyond
    ]  # DeepSeek-V3's MTP layer: not part of the model (noted by import)
    if left:
        raise HFError(f"{left[0]}: checkpoint tensor moeforge cannot place ({len(left)} left over)")
    return out


def state_dict_to_hf(spec: ModelSpec, family: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """HF checkpoint tensors (the Hub's per-expert layout) from our state_dict."""
    out = {theirs: state[ours].contiguous() for ours, theirs in _pairs(spec, family)}
    like = state["tok_embeddings.weight"]
    for key, shape in _zero_fillers(spec, family).items():
        out[key] = like.new_zeros(shape)
    n = _names(family)
    d = spec.moe_derived
    if _pinned_gate(spec, family):
        assert d is not None
        for i in spec.moe_layers:
            m = f"model.layers.{i}.mlp."
            like = state[f"layers.{i}.ffn.router.weight"]
            out[m + "shared_expert_gate.weight"] = like.new_zeros(1, spec.d_model)
            if d.shared_experts:
                out[m + "shared_expert.down_proj.weight"] = (
                    state[f"layers.{i}.ffn.shared.w2.weight"] * 2
                ).contiguous()
            else:  # no shared expert: a zero-width shared MLP, which adds nothing
                out[m + "shared_expert.gate_proj.weight"] = like.new_zeros(0, spec.d_model)
                out[m + "shared_expert.up_proj.weight"] = like.new_zeros(0, spec.d_model)
                out[m + "shared_expert.down_proj.weight"] = like.new_zeros(spec.d_model, 0)
    for i in spec.moe_layers:
        assert d is not None
        m = f"model.layers.{i}.{n['moe']}.experts."
        for ours, theirs in zip(("w1", "w3", "w2"), n["experts"], strict=True):
            stacked = state[f"layers.{i}.ffn.experts.{ours}"]
            for e in range(d.routed_experts):
                out[f"{m}{e}.{theirs}.weight"] = stacked[e].contiguous()
    return out


# ------------------------------------------------------------------------------------------- files
class _LazyTensors(Mapping[str, Any]):
    """Tensors of one or more safetensors files, read on access."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._handles = []
        for f in files:
            try:
                self._handles.append(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise HFError(f"{f}: not a readable safetensors file ({e})") from None
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def __getitem__(self, key: str) -> Any:
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))


def import_hf(
    src: str | Path, out: str | Path, name: str | None = None
) -> tuple[Path, Path | None, list[str]]:
    """`moeforge import hf`: SRC (config.json or a model folder) -> OUT/<name>.yaml [+ OUT/model.safetensors].

    Returns:
        (spec path, weights path or None, notes on fields that were deliberately not imported).
    """
    from ._dump import spec_to_yaml

    src = Path(src)
    config_path = src / "config.json" if src.is_dir() else src
    if not config_path.is_file():
        raise HFError(f"{config_path}: no such config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{config_path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFError(f"{config_path}: a JSON {type(config).__name__}, not an object of config fields")
    model_dir = config_path.parent
    name = name or (model_dir.name if model_dir.name not in ("", ".") else config.get("model_type", "model"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lower() or "model"
    spec, notes = config_to_spec(config, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"Imported from {config_path} (model_type {config['model_type']}) by `moeforge import hf`."
    spec_path = out / f"{name}.yaml"
    spec_path.write_text(spec_to_yaml(spec, header=header))
    files = _weight_files(model_dir) if src.is_dir() else []
    if not files:
        return spec_path, None, notes
    if config.get("quantization_config"):
        raise HFError("quantization_config: quantized checkpoints cannot be imported; dequantize them first")
    from safetensors.torch import save_file

    state = hf_to_state_dict(spec, config["model_type"], _LazyTensors(files))
    weights_path = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_path))
    return spec_path, weights_path, notes


def family_of(spec: ModelSpec) -> str:
    """The family `spec_to_config` exports `spec` as (`--format auto`)."""
    return choose_format(spec)


def _read_checkpoint(spec: ModelSpec, checkpoint: str | Path) -> dict[str, Any]:
    """Our state_dict from a model.safetensors file (or a folder holding one), checked against `spec`."""
    import torch
    from safetensors.torch import load_file

    from ._builder import build

    ckpt = Path(checkpoint)
    if ckpt.is_dir():
        found = [
            p for p in (ckpt / "model.safetensors", ckpt / "checkpoint" / "model.safetensors") if p.is_file()
        ]
        found = found or sorted(ckpt.rglob("model.safetensors"))
        if not found:
            raise HFError(f"{ckpt}: no model.safetensors inside")
        ckpt = found[0]
    if not ckpt.is_file():
        raise HFError(f"{ckpt}: no such checkpoint")
    from safetensors import SafetensorError

    try:
        state = load_file(str(ckpt))
    except (SafetensorError, OSError) as e:
        raise HFError(f"{ckpt}: not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(spec).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise HFError(f"{ckpt}: {key} missing; is it a checkpoint of spec {spec.name!r}?")
        if tuple(state[key].shape) != shape:
            raise HFError(
                f"{ckpt}: {key} has shape {list(state[key].shape)}, spec {spec.name!r} builds {list(shape)}; "
                "is it a checkpoint of this spec?"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise HFError(f"{ckpt}: {extra[0]} is not in spec {spec.name!r} ({len(extra)} such tensors)")
    return state


def _check_out(out: Path, cfg: dict[str, Any], force: bool) -> None:
    """Refuse to mix two models in one folder: OUT may be new, empty, or hold an export of this config."""
    if force or not out.exists():
        return
    if not out.is_dir():
        raise HFError(f"{out}: exists and is not a folder")
    old = out / "config.json"
    if old.is_file():
        try:
            same = json.loads(old.read_text()) == json.loads(json.dumps(cfg))
        except json.JSONDecodeError:
            same = False
        if not same:
            raise HFError(f"{out}: holds another model's config.json; choose a new --out (or --force)")
    elif any(out.glob("*.safetensors")):
        raise HFError(f"{out}: holds weights of another model; choose a new --out (or --force)")


def export_hf(
    spec: ModelSpec,
    out: str | Path,
    checkpoint: str | Path | None = None,
    family: str | None = None,
    card: str | None = None,
    force: bool = False,
) -> tuple[Path, Path | None]:
    """`moeforge export hf`: OUT/config.json, OUT/model.safetensors when a checkpoint is given, OUT/README.md.

    Args:
        spec: the model.
        out: the folder to write; one that holds another model is refused unless `force`.
        checkpoint: our model.safetensors, or a folder holding one (a run dir or its checkpoint/).
        family: a format name (see FAMILIES); None or "auto" picks the first stock one (EXPORT_ORDER).
        card: the model card (README.md); None writes `model_card(spec, format)`.
        force: overwrite whatever OUT holds.

    Raises:
        HFError: no format expresses the spec, the checkpoint does not match it, OUT holds another model.
    """
    from ._hf_card import model_card

    cfg = spec_to_config(spec, family)
    out = Path(out)
    _check_out(out, cfg, force)
    state = _read_checkpoint(spec, checkpoint) if checkpoint is not None else None
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").write_text(card if card is not None else model_card(spec, cfg["model_type"]))
    if state is None:
        return config_path, None
    from safetensors.torch import save_file

    tensors = state_dict_to_hf(spec, cfg["model_type"], state)
    weights_path = out / "model.safetensors"
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    return config_path, weights_path


def hf_model_from_config(config: Mapping[str, Any], device: str = "cpu"):
    """transformers' model for a config dict (eager attention); needs transformers (a test/dev dependency)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    family = cfg.pop("model_type")
    cfg.pop("architectures", None)
    hf_cfg = AutoConfig.for_model(family, **cfg)
    hf_cfg._attn_implementation = "eager"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")


def check_against_transformers(spec: ModelSpec, out: str | Path, ids: Any = None) -> dict[str, Any]:
    """Load OUT with transformers (no remote code) and compare with our model built from the same weights.

    Args:
        spec: the exported spec.
        out: an export folder.
        ids: [B, T] token ids to compare logits on (held-out text); default 2 x 16 random ids.

    Returns:
        params_ours (moeforge's total), params_transformers (num_parameters() of the loaded class),
        params_added (what explains their difference, by tensor), and with weights max_abs_logit_diff,
        max_rel_logit_diff (max |a - b| / max |b|, fp32), generated (a few greedy tokens).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ._accounting import account
    from ._builder import build

    out = Path(out)
    cfg = json.loads((out / "config.json").read_text())
    added = added_parameters(spec, cfg["model_type"])
    result: dict[str, Any] = {
        "format": cfg["model_type"],
        "params_ours": account(spec).params_total,
        "params_added": added,
    }
    if not (out / "model.safetensors").is_file():
        with torch.device("meta"):
            meta = hf_model_from_config(cfg, "meta")
        result["params_transformers"] = sum(p.numel() for p in meta.parameters())
        return result
    from safetensors.torch import load_file

    hf = AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager", dtype=torch.float32
    ).eval()
    result["params_transformers"] = hf.num_parameters()
    ours = build(spec, dtype=torch.float32).eval()
    state = hf_to_state_dict(spec, cfg["model_type"], load_file(str(out / "model.safetensors")))
    ours.load_state_dict({k: v.float() for k, v in state.items()})
    if ids is None:
        ids = torch.randint(
            0, spec.vocab_size, (2, min(16, spec.seq_len)), generator=torch.Generator().manual_seed(0)
        )
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
        gen = hf.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    result["compared_tokens"] = int(ids.numel())
    result["max_abs_logit_diff"] = float((a - b).abs().max())
    result["max_rel_logit_diff"] = float((a - b).abs().max() / b.abs().max())
    result["generated"] = gen[0, 8:].tolist()
    return result


def check_passes(result: Mapping[str, Any], tolerance: float = 1e-5) -> bool:
    """Counts agree once the added parameters are accounted for, and logits within `tolerance` relative."""
    counted = result["params_ours"] + sum(result["params_added"].values())
    return counted == result["params_transformers"] and result.get("max_rel_logit_diff", 0.0) <= tolerance


__all__ = [
    "EXPORT_ORDER",
    "FAMILIES",
    "REMOTE_CODE",
    "HFError",
    "added_parameters",
    "check_against_transformers",
    "check_passes",
    "choose_format",
    "config_to_spec",
    "export_hf",
    "family_of",
    "hf_to_state_dict",
    "import_hf",
    "spec_to_config",
    "state_dict_to_hf",
]
