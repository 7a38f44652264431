"""The WSD schedule, branched cooldowns and AdamW's beta2, on the debug spec."""

from __future__ import annotations

import math

import pytest
import torch
from moeforge.compiler import build
from moeforge.runtime import (
    TrainConfig,
    branch_point,
    find_checkpoint,
    ladder_tokens,
    lr_at,
    make_optimizer,
    train,
    train_cooldown,
    train_stable,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _wsd(**kw) -> TrainConfig:
    base = {
        "device": "cpu",
        "batch_size": 2,
        "eval_tokens": 512,
        "eval_points": 1,
        "schedule": "wsd",
        "lr": 3e-3,
        "warmup_tokens": 512,
        "warmup": 0.25,  # ignored beside warmup_tokens: were it read, the stable phase would depend on the total
    }
    return TrainConfig(**{**base, **kw})


def test_wsd_shape_warmup_flat_1sqrt_cooldown_floor():
    cfg = TrainConfig(steps=1, lr=1.0, min_lr_ratio=0.1, schedule="wsd", cooldown=0.2, warmup_tokens=100)
    total = 1000
    lr = [lr_at(cfg, t / total, t) for t in range(total + 1)]
    assert lr[0] == 0 and lr[50] == pytest.approx(0.5)  # linear warmup over 100 tokens
    assert set(lr[100:801]) == {1.0}  # flat: exactly the peak up to the cooldown at 80%
    q = 0.25  # a quarter into the cooldown: 1 - sqrt(1/4) = half way down to the floor
    assert lr[850] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(q)))
    assert lr[1000] == pytest.approx(0.1)  # ends at the configured minimum
    assert all(a >= b for a, b in zip(lr[800:-1], lr[801:], strict=True))  # the cooldown only goes down
    linear = cfg.model_copy(update={"cooldown_shape": "linear"})
    assert lr_at(linear, 0.9, 900) == pytest.approx(0.55)


def test_wsd_stable_phase_does_not_depend_on_the_total():
    cfg = _wsd(steps=1, lr=1.0)
    for t in (0, 100, 511, 512, 4000, 7999):
        values = {lr_at(cfg, t / total, t) for total in (10_000, 20_000, 1_000_000)}
        assert len(values) == 1, (t, values)
    # a fractional warmup does depend on it (why branching asks for warmup_tokens)
    frac = cfg.model_copy(update={"warmup_tokens": None, "warmup": 0.05})
    assert lr_at(frac, 100 / 10_000) != lr_at(frac, 100 / 20_000)


def test_cosine_default_unchanged():
    cfg = TrainConfig(steps=1)
    assert (cfg.schedule, cfg.beta2, cfg.warmup_tokens) == ("cosine", 0.95, None)
    assert lr_at(cfg, 0.5) == lr_at(cfg, 0.5, 12345)  # tokens matter only with warmup_tokens


def test_config_validation_and_the_old_decay_fraction():
    for bad, key in (
        ({"cooldown": 1.5}, "cooldown"),
        ({"cooldown": -0.1}, "cooldown"),
        ({"cooldown_shape": "cosine"}, "cooldown_shape"),
        ({"beta2": 1.0}, "beta2"),
        ({"beta2": 0}, "beta2"),
        ({"warmup_tokens": 0}, "warmup_tokens"),
        ({"decay_fraction": 0.2, "cooldown": 0.2}, "decay_fraction"),
    ):
        with pytest.raises(ValueError, match=key):
            TrainConfig.from_dict({"steps": 1, **bad})
    old = TrainConfig.from_dict({"steps": 1, "schedule": "wsd", "decay_fraction": 0.3})  # an old run dir
    assert (old.cooldown, old.cooldown_shape) == (0.3, "linear")
    assert "decay_fraction" not in old.to_dict()


def test_beta2_reaches_the_optimizer(spec):
    opt = make_optimizer(build(spec), TrainConfig(steps=1, beta2=0.99), torch.device("cpu"))
    assert {g["betas"] for g in opt.param_groups} == {(0.9, 0.99)}


def test_branch_point_is_a_step_boundary_before_the_cooldown(spec):
    cfg = _wsd(steps=1)
    step = cfg.batch_size * spec.seq_len  # 256 tokens
    assert branch_point(cfg, 10 * step, spec.seq_len) == 8 * step  # 80% of a whole number of steps
    b = branch_point(cfg, 10 * step + 100, spec.seq_len)  # 80% is 2128 tokens: step 8 ends before it
    assert b == 8 * step and b / (10 * step + 100) <= 0.8 < (b + step) / (10 * step + 100)
    branched, separate = ladder_tokens(cfg, [5 * step, 10 * step, 20 * step], spec.seq_len)
    assert (branched, separate) == (16 * step + (1 + 2 + 4) * step, 35 * step)
    with pytest.raises(ValueError, match="warmup_tokens"):
        branch_point(cfg, 2 * step, spec.seq_len)  # the cooldown would start inside the warmup
    with pytest.raises(ValueError, match="schedule"):
        branch_point(cfg.model_copy(update={"schedule": "cosine"}), 10 * step, spec.seq_len)


def _model(spec, seed=0):
    return build(spec, seed=seed)


def test_branched_cooldowns_equal_straight_runs(spec, fpt, corpus, tmp_path):
    step = 2 * spec.seq_len
    totals = [6 * step, 11 * step + 40]  # the second ends in a short step
    kw = {"seq_len": spec.seq_len, "train_flops_per_token": fpt, "corpus": corpus}
    stable = train_stable(_model(spec), **kw, cfg=_wsd(tokens=1), totals=totals, out_dir=tmp_path / "stable")
    assert stable.summary is not None and stable.summary.tokens == max(
        branch_point(_wsd(tokens=1), t, spec.seq_len) for t in totals
    )
    for total in totals:
        straight_model = _model(spec)
        straight = train(straight_model, **kw, cfg=_wsd(tokens=total), progress=False)
        branched_model = _model(spec, seed=1)  # its weights come from the branch
        branched = train_cooldown(
            branched_model,
            **kw,
            cfg=_wsd(tokens=total),
            branch=stable.branches[total],
            out_dir=tmp_path / f"budget-{total}",
        )
        assert branched.tokens == straight.tokens == total
        assert branched.final_val_loss == pytest.approx(straight.final_val_loss, abs=1e-6)
        for a, b in zip(straight_model.parameters(), branched_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # extending a stable run by resuming: the same branches as one call to the largest total
    kw_stable = {**kw, "cfg": _wsd(tokens=1), "out_dir": tmp_path / "extended"}
    first = train_stable(_model(spec), **kw_stable, totals=totals[:1])
    assert first.summary is not None and stable.summary is not None
    assert first.summary.tokens == branch_point(_wsd(tokens=1), totals[0], spec.seq_len)
    extended = train_stable(_model(spec, seed=1), **kw_stable, totals=totals)  # weights from its checkpoint
    assert extended.summary is not None
    assert extended.summary.tokens == stable.summary.tokens
    assert len(extended.summary.segments) == 2  # resumed, not started over
    for total in totals:
        a = load_file(find_checkpoint(stable.branches[total]) / "model.safetensors")
        b = load_file(find_checkpoint(extended.branches[total]) / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = train_stable(_model(spec), **kw_stable, totals=totals)  # every branch there: trains nothing
    assert again.summary == extended.summary
    # a budget of another lr cannot use the branch
    with pytest.raises(ValueError, match="lr"):
        train_cooldown(
            _model(spec),
            **kw,
            cfg=_wsd(tokens=totals[0], lr=1e-3),
            branch=stable.branches[totals[0]],
            out_dir=tmp_path / "other",
        )
