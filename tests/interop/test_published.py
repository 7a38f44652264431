"""Published configs: our exact counts equal transformers' model built on the meta device, and REFERENCE.md.

DeepSeekMoE 16B's remote-code `deepseek` model_type has no transformers class: its counts are checked against
the exact figures in REFERENCE.md (as are DeepSeek-V3's and Mixtral's). The shipped specs are these imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moeforge.compiler._hf.importer import config_to_spec

from moeforge import compiler

CONFIGS = Path(__file__).parent / "configs"
NAMES = sorted(p.name for p in CONFIGS.iterdir() if (p / "config.json").is_file())
# REFERENCE.md: exact totals and activated counts (both embeddings counted; the V3 selection bias counted)
REFERENCE = {
    "deepseek-v3": (671_026_419_200, 37_552_297_472),
    "mixtral-8x7b": (46_702_792_704, 12_879_925_248),
    "deepseek-moe-16b": (16_375_728_128, 2_828_650_496),
}


def _load(name: str):
    return json.loads((CONFIGS / name / "config.json").read_text())


def _meta_model(config: dict):
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map", "architectures")}
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_cfg)


def test_all_published_configs_present():
    assert len(NAMES) == 8


@pytest.mark.parametrize("name", NAMES)
def test_counts_equal_transformers_on_meta(name):
    config = _load(name)
    spec, _ = config_to_spec(config, name)
    acc = compiler.account(spec)
    if name in REFERENCE:
        assert (acc.params_total, acc.params_activated) == REFERENCE[name]
    if config["model_type"] == "deepseek":
        return  # remote code only: REFERENCE.md above is the check
    model = _meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    d = spec.moe_derived
    bias = len(spec.moe_layers) * d.routed_experts if spec.moe.gate.selection_bias else 0  # a buffer there
    assert acc.params_total == total + bias
    # Activated, from transformers' modules: every routed expert bank counts top_k / routed of its weights.
    experts = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".experts." in n or n.endswith((".experts.gate_up_proj", ".experts.down_proj"))
    )
    assert experts * d.top_k % d.routed_experts == 0
    assert acc.params_activated == total + bias - experts + experts * d.top_k // d.routed_experts


SHIPPED = {
    "deepseek-moe-16b": "deepseekmoe-16b"
}  # shipped before the importer existed, under the paper's name


def _comparable(spec) -> dict:
    data = spec.model_dump()
    data["name"] = None
    data["attention"]["head_dim"] = spec.head_dim  # d_model / n_heads written out or not: the same model
    return data


@pytest.mark.parametrize("name", NAMES)
def test_shipped_spec_is_the_import(name):
    shipped = compiler.load_spec(SHIPPED.get(name, name))
    imported, _ = config_to_spec(_load(name), name)
    assert _comparable(shipped) == _comparable(imported)
