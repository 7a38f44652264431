"""The analytic counts against what torch measures on the built model: FlopCounterMode, fvcore, numel."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from moeforge.compiler import ModelSpec, account, build, load_spec, measure
from moeforge.compiler._measure import _flop_counter_mapping
from spec_strategies import model_specs
from torch.utils.flop_counter import FlopCounterMode

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY = {"max_heads": 4, "head_dims": (2, 4, 8, 16), "max_layers": 2, "max_hidden": 48, "max_seq": 32}


def rel(measured: float, analytic: float) -> float:
    return abs(measured - analytic) / analytic


def tiny_spec(**overrides) -> ModelSpec:
    base = load_spec("debug").model_dump()
    base.update(seq_len=32, **overrides)
    return ModelSpec.model_validate(base)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_specs(**TINY))
def test_drawn_specs_agree_with_three_counters(spec: ModelSpec) -> None:
    acc = account(spec)
    m = measure(spec, batch_size=2)
    assert m["params_total"] == acc.params_total
    assert rel(m["forward_flops_per_token"], acc.forward_flops_per_token) <= 0.005
    assert rel(m["train_flops_per_token"], acc.train_flops_per_token) <= 0.01
    assert rel(m["fvcore_forward_flops_per_token"], acc.forward_flops_per_token) <= 0.005
    # With the reference expert loop nothing but the counted matmuls runs: agreement is exact.
    assert m["forward_flops_per_token"] == acc.forward_flops_per_token
    assert m["train_flops_per_token"] == acc.train_flops_per_token
    assert m["fvcore_forward_flops_per_token"] == acc.forward_flops_per_token


MLA = {
    "kind": "mla",
    "n_heads": 4,
    "kv_lora_rank": 8,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
}
DEEPSEEK_FEATURES = {
    "mla": {"attention": {**MLA, "q_lora_rank": 12, "bias": True}},
    "mla-without-q-latent": {"attention": MLA},
    "sigmoid": {"gate": {"score": "sigmoid", "normalize_topk": True, "routed_scaling": 2.5}},
    "selection-bias": {"gate": {"selection_bias": True, "bias_update_speed": 0.001}},
    "selection-bias-buffer": {"gate": {"selection_bias": True, "bias_is_parameter": False}},
    "v2-groups": {"gate": {"n_group": 4, "topk_group": 2}},
    "v3-groups": {"gate": {"score": "sigmoid", "selection_bias": True, "n_group": 2, "topk_group": 1}},
    "shared-gate": {"shared_gate": True},
}


@pytest.mark.parametrize("feature", DEEPSEEK_FEATURES)
def test_each_deepseek_feature_agrees_with_three_counters(feature: str) -> None:
    # Each feature alone on the debug model, so none depends on what the hypothesis draws above happen to hit.
    change = DEEPSEEK_FEATURES[feature]
    base = load_spec("debug").model_dump()
    moe = {**base["moe"], **{k: v for k, v in change.items() if k != "attention"}}
    spec = tiny_spec(attention=change.get("attention", base["attention"]), moe=moe)
    acc = account(spec)
    m = measure(spec, batch_size=2)
    assert m["params_total"] == acc.params_total
    assert m["forward_flops_per_token"] == acc.forward_flops_per_token
    assert m["train_flops_per_token"] == acc.train_flops_per_token
    assert m["fvcore_forward_flops_per_token"] == acc.forward_flops_per_token


def test_measure_returns_the_documented_keys() -> None:
    spec = tiny_spec()
    m = measure(spec, batch_size=3, seq_len=8)
    assert set(m) >= {
        "forward_flops_per_token",
        "train_flops_per_token",
        "fvcore_forward_flops_per_token",
        "params_total",
        "seq_len",
        "batch_size",
    }
    assert (m["seq_len"], m["batch_size"], m["dispatch"]) == (8, 3, "loop")
    # attention FLOPs follow the measured context length, not the spec's
    assert (
        m["forward_flops_per_token"]
        == account(spec.model_copy(update={"seq_len": 8})).forward_flops_per_token
    )
    assert m["forward_flops_per_token"] != account(spec).forward_flops_per_token


def test_dense_spec_has_no_dispatch() -> None:
    spec = tiny_spec(moe=None)
    m = measure(spec)
    assert m["dispatch"] is None
    assert m["forward_flops_per_token"] == account(spec).forward_flops_per_token


def test_measured_attention_is_the_full_square_and_causal_halves_its_core() -> None:
    spec = tiny_spec(n_layers=3)
    m = measure(spec)
    full, causal = account(spec), account(spec, causal=True)
    core = 4 * spec.seq_len * spec.attention.n_heads * spec.head_dim * spec.n_layers
    assert m["forward_flops_per_token"] == full.forward_flops_per_token
    assert m["forward_flops_per_token"] - causal.forward_flops_per_token == core // 2


def test_too_big_to_measure_is_a_one_line_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import moeforge.compiler._measure as measure_module

    monkeypatch.setattr(measure_module, "_physical_memory", lambda: 1 << 20)
    with pytest.raises(ValueError, match="too big to measure") as info:
        measure(load_spec("debug"))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- each dispatch path
def _dispatches() -> list[str]:
    from moeforge.runtime import _experts

    names = [d for d in getattr(_experts, "DISPATCHES", ("loop",)) if d != "auto"]
    if "grouped_mm" in names and not _experts.grouped_mm_supported(torch.device("cpu"), torch.float32):
        names.remove("grouped_mm")
    return names


def _expected_routed_flops(mode: str, experts, T: int, K: int, n_matrices: int, cf: float | None) -> int:
    """The expert matmuls one routed-experts module executes forward, given how its tokens were spread."""
    D, F, E = experts.dim, experts.hidden, experts.n_experts
    kept = experts.last_counts_E
    if cf is not None:  # each expert keeps its first ceil(cf * T * K / E) pairs
        kept = kept.clamp(max=math.ceil(cf * T * K / E))
    if mode == "loop":  # every chosen (token, expert) pair once, dropped or not: the accounting's count
        return 2 * T * K * n_matrices * D * F
    if mode == "grouped_mm":  # kept rows only; D and F zero-padded to 16-byte strides
        Dp, Fp = (-(-x // 4) * 4 for x in (D, F))
        return 2 * int(kept.sum()) * n_matrices * Dp * Fp
    if mode == "fused_loop":  # kept rows only, no padding (gate and up run as one 2F-wide matmul)
        return 2 * int(kept.sum()) * n_matrices * D * F
    if mode == "padded_bmm":  # every expert's buffer padded to the busiest expert's count
        return 2 * E * int(kept.max()) * n_matrices * D * F
    raise AssertionError(f"no expectation for dispatch {mode!r}")


@pytest.mark.parametrize("mode", _dispatches())
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_each_dispatch_counts_what_it_runs(mode: str, capacity_factor: float | None) -> None:
    spec = tiny_spec(moe={**load_spec("debug").model_dump()["moe"], "capacity_factor": capacity_factor})
    acc = account(spec)
    model = build(spec, seed=0)
    for _, moe in model.moe_layers():
        moe.experts.dispatch = mode
    B, S = 2, spec.seq_len
    ids = torch.randint(0, spec.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    mapping = _flop_counter_mapping()
    with torch.no_grad():
        model(ids[:, :2])  # warm-up outside the counter (`auto` probes)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fwd:
        model(ids)
    by_module = fwd.get_flop_counts()
    d = spec.moe_derived
    assert d is not None
    expected_routed = 0
    for i, moe in model.moe_layers():
        got = sum(by_module.get(f"Transformer.layers.{i}.ffn.experts", {}).values())
        want = _expected_routed_flops(mode, moe.experts, B * S, d.top_k, spec.ffn.n_matrices, capacity_factor)
        # The gate-weighted combine out_t = sum_k g_tk y_tk is not a weight matmul; a dispatch may still
        # run it as a [T,1,K] @ [T,K,D] bmm, which counts 2*T*K*D.
        combine = 2 * B * S * d.top_k * spec.d_model
        assert got in (want, want + combine), f"layer {i} ({mode}): {got} vs {want} (+{combine} combine)"
        expected_routed += got
    # Everything outside the routed experts is exactly the analytic count.
    tokens = B * S
    outside = acc.forward_flops_per_token - acc.forward_flops["routed_experts"]
    assert fwd.get_total_flops() == outside * tokens + expected_routed
    if mode == "loop" or (mode in ("grouped_mm", "fused_loop") and capacity_factor is None):  # D, F aligned
        assert fwd.get_total_flops() == acc.forward_flops_per_token * tokens

    # Backward is twice the forward for every op here, whatever the dispatch; fvcore sees the same forward.
    with FlopCounterMode(display=False, custom_mapping=mapping) as train:
        logits = model(ids).logits
        logits.backward(torch.randn(logits.shape))
    assert train.get_total_flops() == 3 * fwd.get_total_flops()
    m = measure(spec, batch_size=B, dispatch=mode)
    assert m["fvcore_forward_flops_per_token"] == m["forward_flops_per_token"]
    assert m["train_flops_per_token"] == 3 * m["forward_flops_per_token"]
