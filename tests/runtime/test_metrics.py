"""MoE load metrics: statistics of per-expert counts, and the tracker that accumulates them."""

from __future__ import annotations

import math

import pytest
import torch
from moeforge.compiler import build, load_spec
from moeforge.runtime import LoadTracker, load_stats


def test_load_stats_of_known_counts():
    s = load_stats(torch.tensor([6, 2, 0, 0]))
    assert s["tokens"] == 8 and s["tokens_per_expert"] == [6, 2, 0, 0]
    assert s["max_over_mean"] == pytest.approx(3.0)
    assert s["cv"] == pytest.approx(math.sqrt((16 + 0 + 4 + 4) / 4) / 2)  # population std / mean
    assert s["dead"] == 2
    even = load_stats(torch.tensor([5, 5, 5]))
    assert even["cv"] == 0 and even["max_over_mean"] == 1 and even["dead"] == 0
    assert load_stats(torch.zeros(3, dtype=torch.int64))["cv"] is None


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return build(load_spec("debug"), seed=0)


def test_tracker_counts_every_routed_pair(model):
    tracker = LoadTracker(model)
    x = torch.randint(0, 256, (3, 16))
    for _ in range(2):
        model(x)
        tracker.update()
    K, E = model.moe_layers()[0][1].top_k, model.moe_layers()[0][1].n_routed
    window = tracker.window_stats()
    assert sorted(window) == [str(i) for i, _ in model.moe_layers()]
    assert all(w["tokens"] == 2 * 3 * 16 * K for w in window.values())
    assert tracker.window_stats() == {}  # reset by reading
    model(x)
    tracker.update()
    summary = tracker.summary()
    for i, _ in model.moe_layers():
        layer = summary["layers"][str(i)]
        assert len(layer["tokens_per_expert"]) == E and layer["tokens"] == 3 * 3 * 16 * K
    restored = LoadTracker(model)
    restored.load_state_tensors(tracker.state_tensors(), torch.device("cpu"))
    assert restored.summary() == summary


def test_router_hook_fallback_agrees_with_the_experts_counts(model):
    x = torch.randint(0, 256, (2, 16))
    direct = LoadTracker(model)
    model(x)
    direct.update()
    # experts that do not record counts: the tracker hooks the router instead
    saved = {}
    for i, moe in model.moe_layers():
        saved[i] = moe.experts.last_counts_E
        del moe.experts.last_counts_E
    try:
        hooked = LoadTracker(model)
        model(x)
        hooked.update()
        hooked.close()
    finally:
        for i, moe in model.moe_layers():
            moe.experts.last_counts_E = saved[i]
    assert hooked.summary() == direct.summary()


def test_capacity_mode_reports_the_dropped_fraction_in_training(tmp_path):
    """A spec with a capacity factor drops tokens; the load summary says how many."""
    from moeforge.compiler import account, build, load_spec
    from moeforge.runtime import TrainConfig, load_corpus, train

    spec = load_spec("debug", ["moe.capacity_factor=0.5"])
    corpus = load_corpus(cache_dir=tmp_path, vocab_size=256)
    summary = train(
        build(spec, seed=0),
        seq_len=spec.seq_len,
        train_flops_per_token=account(spec).train_flops_per_token,
        corpus=corpus,
        cfg=TrainConfig(steps=2, batch_size=2, device="cpu", eval_tokens=512, eval_points=1),
        progress=False,
    )
    layers = summary.load["layers"]
    fractions = [v["dropped_fraction"] for v in layers.values()]
    assert fractions and all(0.4 <= f < 1.0 for f in fractions)  # capacity 0.5 keeps at most half


def test_dropped_fraction_is_a_running_sum_reset_when_read():
    """Capacity mode keeps one sum per layer (not one tensor per step) for the window and for the run."""
    model = build(load_spec("debug", ["moe.capacity_factor=0.5"]), seed=0)
    tracker = LoadTracker(model)
    seen: dict[int, list[float]] = {i: [] for i, _ in model.moe_layers()}
    sums: dict[int, torch.Tensor] = {}
    for step in range(4):
        model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step)))
        tracker.update()
        for i, moe in model.moe_layers():
            seen[i].append(float(moe.experts.last_dropped_fraction))
            s, n = tracker._dropped[i]
            assert n == len(seen[i]) and sums.setdefault(i, s) is s  # the same tensor, added in place
        if step == 1:
            window = tracker.window_stats()
            for i in seen:
                assert window[str(i)]["dropped_fraction"] == pytest.approx(sum(seen[i]) / 2)
                seen[i] = []  # the next window starts from zero
            assert tracker._dropped == {}
            sums = {}
    window = tracker.window_stats()
    run = tracker.summary()["layers"]
    for i, fr in seen.items():
        assert window[str(i)]["dropped_fraction"] == pytest.approx(sum(fr) / 2)
        assert tracker._dropped_run[i][1] == 4 and 0 < run[str(i)]["dropped_fraction"] < 1
