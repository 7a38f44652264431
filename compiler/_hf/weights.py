"""Tensor names and layouts: HF checkpoint tensors <-> our state_dict.

Weights travel in the Hub's per-expert layout (``mlp.experts.{e}.gate_proj.weight``; Mixtral's
``block_sparse_moe.experts.{e}.w1.weight``), which transformers 5 also writes; its fused in-memory layout
(``mlp.experts.gate_up_proj``) is read too. Mapping to ours: gate_proj/w1 -> w1, up_proj/w3 -> w3,
down_proj/w2 -> w2, stacked over experts; the attention and norms map one to one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .._spec import MLASpec, ModelSpec
from .formats import MARKER, HFError


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


__all__ = ["added_parameters", "hf_to_state_dict", "state_dict_to_hf"]
