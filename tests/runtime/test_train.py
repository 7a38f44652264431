"""Budgeted training on the debug spec: budget exactness, learning, resume, divergence, checkpoints."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from moeforge.compiler import account, build, load_spec
from moeforge.runtime import (
    Diverged,
    TrainConfig,
    load_checkpoint,
    lr_at,
    make_optimizer,
    planned_tokens,
    train,
)
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _train(spec, fpt, corpus, cfg, out_dir=None, seed=0, **kw):
    model = build(spec, seed=seed)
    summary = train(
        model,
        seq_len=spec.seq_len,
        train_flops_per_token=fpt,
        corpus=corpus,
        cfg=cfg,
        out_dir=out_dir,
        progress=False,
        **kw,
    )
    return model, summary


def _cfg(**kw) -> TrainConfig:
    base = {"device": "cpu", "batch_size": 4, "eval_tokens": 1024, "eval_points": 2}
    return TrainConfig(**{**base, **kw})


def test_flop_budget_is_hit_to_the_token(spec, fpt, corpus):
    # not a whole number of steps nor of sequences: the last step is short and ends in a cut sequence
    budget = (3 * 4 * spec.seq_len + 2 * spec.seq_len + 37) * fpt + fpt // 2
    _, s = _train(spec, fpt, corpus, _cfg(budget_flops=float(budget)))
    assert s.tokens == budget // fpt == planned_tokens(_cfg(budget_flops=float(budget)), spec.seq_len, fpt)
    assert s.train_flops == s.tokens * fpt
    assert abs(s.train_flops - budget) / budget < 0.01 and s.train_flops <= budget
    assert s.budget_flops == budget
    assert s.steps == 4


def test_steps_and_tokens_budgets(spec, fpt, corpus):
    _, s = _train(spec, fpt, corpus, _cfg(steps=3))
    assert (s.steps, s.tokens) == (3, 3 * 4 * spec.seq_len)
    _, s = _train(spec, fpt, corpus, _cfg(tokens=1000))
    assert (s.steps, s.tokens) == (2, 1000)


@pytest.mark.parametrize(
    "bad", [{}, {"steps": 1, "tokens": 5}, {"steps": 0}, {"steps": 2, "micro_batch_size": 8}]
)
def test_config_rejects_bad_budgets(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{"batch_size": 4, **bad})


def test_config_is_one_closed_frozen_model():
    with pytest.raises(ValueError, match="Extra inputs"):
        TrainConfig(steps=1, eval_token=8)  # a typo is an error, not a silent default
    cfg = TrainConfig(steps=1, tokens=None, batch_size=4)
    with pytest.raises(ValueError, match="frozen"):
        cfg.lr = 1.0  # type: ignore[misc]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what a run dir recorded reloads
    with pytest.raises(ValueError, match=r"^stale: unknown training option \(known: .*budget_flops"):
        TrainConfig.from_dict({**cfg.to_dict(), "stale": 1})  # never silently dropped
    with pytest.raises(ValueError) as e:  # one line per problem, as the CLI prints them
        TrainConfig.from_dict({"steps": 2, "batch_size": 4, "lr": 0, "warmup": 1})
    assert str(e.value).splitlines() == [
        "lr: must be greater than 0 (got 0)",
        "warmup: 1.0 must be a fraction in [0, 1)",
    ]


def test_loss_falls_and_run_dir_is_complete(spec, fpt, corpus, tmp_path):
    evals = []
    _, s = _train(
        spec,
        fpt,
        corpus,
        _cfg(tokens=40 * 8 * spec.seq_len, batch_size=8, eval_points=4),
        tmp_path,
        on_eval=lambda f, m: evals.append((f, m["val_loss"])),
    )
    assert s.status == "completed"
    assert s.final_val_loss < s.initial_val_loss - 1.0  # from ~ln 256 = 5.5 towards byte-level ~3
    assert s.val_bits_per_byte == pytest.approx(s.final_val_loss / math.log(2))
    assert [f for f, _ in evals] == [0.25, 0.5, 0.75, 1.0]
    assert evals[-1][1] == s.final_val_loss
    for key in (
        "tokens",
        "train_flops",
        "budget_flops",
        "tokens_per_second",
        "steps",
        "wall_s",
        "device",
        "load",
    ):
        assert key in s.to_dict()
    assert json.loads((tmp_path / "summary.json").read_text()) == s.to_dict()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [10, 20, 30, 40]
    assert train_lines[-1]["loss"] == pytest.approx(train_lines[-1]["ce"] + train_lines[-1]["aux"])
    assert train_lines[0]["aux"] > 0  # the debug spec's expert-level balance loss is in the loss
    layers = [i for i, _ in build(spec).moe_layers()]
    assert sorted(train_lines[0]["load"]) == [str(i) for i in layers]
    # every routed pair of the window is counted: 10 steps x 8 x seq_len tokens x top-k
    assert train_lines[0]["load"][str(layers[0])]["tokens"] == 10 * 8 * spec.seq_len * spec.moe_derived.top_k
    total = s.load["layers"][str(layers[0])]["tokens_per_expert"]
    assert sum(total) == s.tokens * spec.moe_derived.top_k and len(total) == spec.moe_derived.routed_experts
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]


def test_checkpoint_loads_without_unpickling(spec, fpt, corpus, tmp_path, monkeypatch):
    model, s = _train(spec, fpt, corpus, _cfg(steps=3), tmp_path)

    def no_pickle(*a, **k):
        raise AssertionError("checkpoint loading unpickled something")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    fresh = build(spec, seed=123)
    opt = make_optimizer(fresh, _cfg(steps=3), torch.device("cpu"))
    state, tensors = load_checkpoint(tmp_path / "checkpoint", fresh, opt)
    assert state["step"] == 3 and state["tokens"] == s.tokens
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    adam = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    assert all(float(st["step"]) == 3 and st["exp_avg_sq"].abs().sum() > 0 for st in adam)
    assert "rng.data" in tensors
    with safe_open(str(tmp_path / "checkpoint" / "optimizer.safetensors"), "pt") as f:
        assert any(k.endswith(".exp_avg") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


class _Crash(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(spec, fpt, corpus, tmp_path):
    cfg = _cfg(steps=8, eval_points=4, checkpoint_every_s=0.0)
    whole, s_whole = _train(spec, fpt, corpus, cfg, tmp_path / "whole")

    def crash(frac, _metrics):
        if frac == 0.5:
            raise _Crash

    with pytest.raises(_Crash):
        _train(spec, fpt, corpus, cfg, tmp_path / "cut", on_eval=crash)
    cut_summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert cut_summary["status"] == "stopped: _Crash" and cut_summary["steps"] == 4

    with pytest.raises(FileExistsError):  # a run dir is not silently overwritten
        _train(spec, fpt, corpus, cfg, tmp_path / "cut")
    resumed, s = _train(
        spec, fpt, corpus, cfg, tmp_path / "cut", resume=True, seed=99
    )  # weights come from disk
    assert (s.steps, s.tokens) == (s_whole.steps, s_whole.tokens)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert s.final_val_loss == pytest.approx(s_whole.final_val_loss, rel=1e-6)
    assert s.initial_val_loss == s_whole.initial_val_loss
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # lines the crashed run wrote after its checkpoint were dropped


def test_resume_to_a_larger_budget_continues(spec, fpt, corpus, tmp_path):
    small = 6 * 4 * spec.seq_len * fpt
    _, s1 = _train(spec, fpt, corpus, _cfg(budget_flops=float(small)), tmp_path)
    _, s2 = _train(spec, fpt, corpus, _cfg(budget_flops=float(2 * small)), tmp_path, resume=True)
    assert s2.tokens == 2 * s1.tokens and s2.steps == 2 * s1.steps
    assert s2.train_flops == 2 * small and s2.segments == [s1.tokens, s2.tokens]
    assert s2.initial_val_loss == s1.initial_val_loss
    assert s2.final_val_loss < s1.final_val_loss
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [6, 10, 12]
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 12
    with pytest.raises(ValueError, match="already trained"):
        _train(spec, fpt, corpus, _cfg(budget_flops=float(small)), tmp_path, resume=True)
    with pytest.raises(ValueError, match="trained with seed 0"):  # the data order would change
        _train(spec, fpt, corpus, _cfg(budget_flops=float(3 * small), seed=1), tmp_path, resume=True)


def test_gradient_accumulation_matches_the_full_batch(fpt, corpus):
    # without the balance loss, which is not linear in the batch (f_i P_i over the tokens it sees)
    spec = load_spec("debug", ["moe.balance.expert_alpha=0"])
    full, _ = _train(spec, fpt, corpus, _cfg(steps=2, eval_points=0))
    accum, _ = _train(spec, fpt, corpus, _cfg(steps=2, eval_points=0, micro_batch_size=2))
    for (name, a), b in zip(full.state_dict().items(), accum.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_nan_loss_raises_diverged(spec, fpt, corpus, tmp_path):
    model = build(spec, seed=0)
    calls = []

    def poison(module, _inputs, out):
        calls.append(module.training)
        return out * float("nan") if sum(calls) >= 2 else out

    model.norm.register_forward_hook(poison)  # the final norm feeds the head
    with pytest.raises(Diverged, match="diverged"):
        # training forwards only: step 1 is fine, step 2 is not
        train(
            model,
            seq_len=spec.seq_len,
            train_flops_per_token=fpt,
            corpus=corpus,
            cfg=_cfg(steps=5),
            out_dir=tmp_path,
            progress=False,
        )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "diverged" and s["steps"] == 1


def test_schedules():
    cos = TrainConfig(steps=1, lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    assert lr_at(cos, 0.05) == pytest.approx(0.5)
    assert lr_at(cos, 0.1) == pytest.approx(1.0)
    assert lr_at(cos, 0.55) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_at(cos, 1.0) == pytest.approx(0.1)
    wsd = TrainConfig(steps=1, lr=1.0, warmup=0.1, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(wsd, 0.5) == lr_at(wsd, 0.8) == 1.0
    assert lr_at(wsd, 0.9) == pytest.approx(0.5)
    assert lr_at(wsd, 1.0) == pytest.approx(0.0)


def test_weight_decay_skips_norms_and_embeddings(spec):
    model = build(spec)
    opt = make_optimizer(model, _cfg(steps=1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert "tok_embeddings.weight" not in names and "norm.weight" not in names
    assert "output.weight" in names and "layers.0.ffn.experts.w1" in names
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_step(spec, fpt, corpus, tmp_path):
    _, s = _train(
        spec, fpt, corpus, TrainConfig(steps=3, batch_size=4, device="cuda", eval_tokens=1024), tmp_path
    )
    assert s.device.startswith("cuda") and s.steps == 3
    assert math.isfinite(s.final_val_loss) and s.final_val_loss < s.initial_val_loss


def test_training_moves_the_selection_bias_by_the_sign_rule(corpus):
    """DeepSeek-V3 aux-loss-free balancing: training applies the sign rule after each step."""
    spec = load_spec(
        "debug",
        ["moe.gate.score=sigmoid", "moe.gate.selection_bias=true", "moe.gate.bias_update_speed=0.01"],
    )
    model, _ = _train(spec, account(spec).train_flops_per_token, corpus, _cfg(steps=3))
    biases = [moe.selection_bias for _, moe in model.moe_layers()]
    assert all(b.abs().sum() > 0 for b in biases)  # moved from zero
    # Each step moves every bias entry by +-speed or 0, so after 3 steps |b| <= 0.03 on a 0.01 grid.
    for b in biases:
        assert b.abs().max() <= 0.03 + 1e-6
        torch.testing.assert_close(b / 0.01, (b / 0.01).round(), atol=1e-4, rtol=0)
