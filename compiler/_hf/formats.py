"""The Hugging Face formats moeforge reads and writes: their names, classes, the order `--format auto` tries
them in, the config key that carries what a stock config cannot say, and the error both directions raise.

Supported ``model_type``s: deepseek (DeepSeekMoE 16B's remote-code config), deepseek_v2, deepseek_v3, glm4_moe,
qwen2_moe, qwen3_moe, mixtral, olmoe, and for dense specs llama, qwen2, qwen3. The modules that use these,
from the bottom up: `importer` (config.json -> spec), `expressible` (which format computes a spec
exactly), `export` (spec -> config.json), `weights` (tensor names both ways), `card` (the model
card), `io` (model folders on disk) and `check` (the comparison with transformers itself).
"""

from __future__ import annotations

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


class HFError(ValueError):
    """A config, checkpoint or spec the other side cannot express; the message names the field."""


def round_coefficient(x: float) -> float:
    """Keep 12 significant digits: coefficient arithmetic (alpha = coef * K) must round-trip exactly."""
    return float(f"{x:.12g}")


__all__ = [
    "ARCHITECTURES",
    "DENSE",
    "EXPORT_ORDER",
    "FAMILIES",
    "MARKER",
    "REMOTE_CODE",
    "HFError",
    "round_coefficient",
]
