"""Our compiled model with imported weights computes transformers' logits (fp32, eager attention).

Each tiny config exercises what its family adds: MLA with and without query compression and YaRN,
group-limited softmax and sigmoid routing with a non-zero selection bias, the Qwen shared-expert gate,
qk-norm per head and over the whole projection, GQA, attention biases. Then the round trips:
HF weights -> import -> export -> transformers gives the same logits; spec -> export -> import the same spec.
"""

from __future__ import annotations

import json

import pytest
import torch
from moeforge.compiler._hf.export import spec_to_config
from moeforge.compiler._hf.importer import config_to_spec
from moeforge.compiler._hf.io import export_hf, import_hf

from moeforge import compiler

from .conftest import tiny_hf_model

pytestmark = pytest.mark.slow  # about 25 s of CPU for twelve tiny models

BASE = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64
)
MLA = dict(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, moe_intermediate_size=12)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip

CASES = {
    # DeepSeek-V2-Lite's shape: no query compression, greedy softmax top-k, 2 shared experts, a dense first layer
    "deepseek_v2_lite": ("deepseek_v2", dict(BASE, **MLA, intermediate_size=48, q_lora_rank=None,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        topk_method="greedy", routed_scaling_factor=1.0)),
    # DeepSeek-V2's: query compression, group-limited routing (max per group), routed scaling, YaRN
    "deepseek_v2_groups_yarn": ("deepseek_v2", dict(BASE, **MLA, intermediate_size=48, q_lora_rank=10,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
        rope_parameters=YARN)),
    # DeepSeek-V3's: sigmoid scores + non-zero selection bias, groups by top-2 sum, renormalized, scaled
    "deepseek_v3": ("deepseek_v3", dict(BASE, **MLA, num_key_value_heads=4, intermediate_size=48, q_lora_rank=10,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "deepseek_v3_noq_halves": ("deepseek_v3", dict(BASE, **MLA, num_key_value_heads=4, intermediate_size=48, q_lora_rank=None,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=0,
        n_group=2, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, rope_interleave=False)),
    # Qwen1.5-MoE's: gated shared expert, qkv bias, GQA, a dense layer via mlp_only_layers
    "qwen2_moe": ("qwen2_moe", dict(BASE, num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=12,
        shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
        norm_topk_prob=False)),
    # Qwen3-MoE's: per-head qk-norm, GQA, explicit head_dim, renormalized top-k
    "qwen3_moe": ("qwen3_moe", dict(BASE, num_key_value_heads=2, head_dim=12, intermediate_size=40,
        moe_intermediate_size=12, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(BASE, num_key_value_heads=2, intermediate_size=24, num_local_experts=4,
        num_experts_per_tok=2)),
    # OLMoE's: qk-norm over the whole projection, attention biases
    "olmoe": ("olmoe", dict(BASE, intermediate_size=12, num_experts=8, num_experts_per_tok=3,
        attention_bias=True)),
    # GLM-4.5's: DeepSeek-V3's routing with GQA, per-head qk-norm, q/k/v bias; RoPE over whole heads
    "glm4_moe": ("glm4_moe", dict(BASE, num_key_value_heads=2, head_dim=12, intermediate_size=48,
        moe_intermediate_size=12, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True, partial_rotary_factor=1.0, num_nextn_predict_layers=0)),
    # dense: llama with biases on all four projections and tied embeddings; qwen2 (q/k/v bias); qwen3 (its
    # default head_dim of 128, per-head qk-norm)
    "llama": ("llama", dict(BASE, num_key_value_heads=2, intermediate_size=48, attention_bias=True,
        tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(BASE, num_key_value_heads=2, intermediate_size=48)),
    "qwen3": ("qwen3", dict(BASE, num_key_value_heads=2, intermediate_size=48)),
}  # fmt: skip


def _ids(spec) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=list(CASES))
def imported(request, tmp_path_factory):
    """(case, transformers model, its folder, our spec, our model with the imported weights)."""
    from safetensors.torch import load_file

    model_type, kw = CASES[request.param]
    hf = tiny_hf_model(model_type, **kw)
    src = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(src)
    out = tmp_path_factory.mktemp(request.param + "_ours")
    spec_path, weights_path, _ = import_hf(src, out, name=request.param)
    spec = compiler.load_spec(spec_path)
    ours = compiler.build(spec).eval()
    ours.load_state_dict(load_file(str(weights_path)))  # strict: keys and shapes match build(spec)
    return request.param, hf, src, spec, ours


def test_logits_equal_transformers(imported):
    case, hf, _, spec, ours = imported
    ids = _ids(spec)
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids).logits
    assert ref.abs().max() > 0.1, "logits too small to tell implementations apart"
    assert _rel(got, ref) < 1e-5, f"{case}: max relative logits difference {_rel(got, ref):.2e}"


def test_param_count_equals_transformers(imported):
    case, hf, _, spec, ours = imported
    n_hf = sum(p.numel() for p in hf.parameters())
    bias = spec.moe and spec.moe.gate.selection_bias and spec.moe.gate.bias_is_parameter  # a buffer there
    expected = n_hf + (len(spec.moe_layers) * spec.moe_derived.routed_experts if bias else 0)
    assert compiler.account(spec).params_total == expected == sum(p.numel() for p in ours.parameters())


def test_import_export_transformers_round_trip(imported, tmp_path):
    from transformers import AutoModelForCausalLM

    case, hf, src, spec, _ = imported
    export_hf(
        spec, tmp_path, checkpoint=src.parent / (src.name.replace(case, case + "_ours")) / "model.safetensors"
    )
    back = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32
    )
    ids = _ids(spec)
    with torch.no_grad():
        assert _rel(back.eval()(ids).logits, hf(ids).logits) < 1e-6


def test_spec_export_import_is_identity(imported):
    _, _, _, spec, _ = imported
    cfg = spec_to_config(spec)
    again, _ = config_to_spec(json.loads(json.dumps(cfg)), spec.name)
    assert again == spec
