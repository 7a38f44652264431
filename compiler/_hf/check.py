"""`moeforge export hf --check`: load an export with transformers (no remote code) and compare it with our
model built from the same weights. transformers is imported only here, and only inside the functions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._accounting import account
from .._spec import ModelSpec
from .weights import added_parameters, hf_to_state_dict


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

    from .._builder import build

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


__all__ = ["check_against_transformers", "check_passes", "hf_model_from_config"]
