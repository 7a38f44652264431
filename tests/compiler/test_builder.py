"""`materialize` of a model built on the meta device is the model `build` makes, tensor by tensor."""

from __future__ import annotations

import pytest
import torch
from moeforge.compiler import build, load_spec, materialize

VARIANTS = {
    "debug": [],
    "gqa, qk norm": ["attention.kind=gqa", "attention.n_kv_heads=2", "attention.qk_norm=head"],
    "mla": [
        "attention={kind: mla, n_heads: 4, q_lora_rank: 32, kv_lora_rank: 16, qk_nope_head_dim: 8, "
        "qk_rope_head_dim: 8, v_head_dim: 8}"
    ],
    "layernorm, tied, learned positions": [
        "norm.kind=layernorm",
        "tie_embeddings=true",
        "positions={kind: learned}",
    ],
    "sigmoid, selection bias parameter": [
        "moe.gate.score=sigmoid",
        "moe.gate.selection_bias=true",
        "moe.shared_gate=true",
    ],
    "selection bias buffer": [
        "moe.gate.score=sigmoid",
        "moe.gate.selection_bias=true",
        "moe.gate.bias_is_parameter=false",
    ],
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_materialized_meta_build_equals_a_direct_build(overrides):
    spec = load_spec("debug", overrides)
    direct = build(spec, seed=7)
    meta = build(spec, device="meta", seed=7)
    assert all(t.is_meta for t in meta.state_dict().values())
    late = materialize(meta, spec, "cpu", seed=7)
    a, b = direct.state_dict(keep_vars=True), late.state_dict(keep_vars=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for (name, x), (_, y) in zip(direct.named_buffers(), late.named_buffers(), strict=True):
        assert torch.equal(x, y), name  # non-persistent buffers too (routing counts)
    other = build(spec, seed=8).state_dict()
    assert not torch.equal(other["tok_embeddings.weight"], a["tok_embeddings.weight"])  # the seed decides
