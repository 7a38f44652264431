"""Searches across budgets and sizes: a budget ladder trains every architecture at every budget once, the
size axis scales the model to its targets, `train.hparams: deepseek` follows its power laws, and every
trial records what a scaling-law fit needs."""

import itertools

import optuna
import pytest
from fakes import fake_evaluator
from moeforge.compiler import SpecError, account
from moeforge.search import WorkerOptions, make_sampler, run_worker, trial_records, trial_to_spec
from moeforge.search._results import evidence
from moeforge.search._samplers import make_pruner
from moeforge.search._seeds import tied
from moeforge.search._space import Infeasible, grid_space
from moeforge.search._spec import (
    MIN_STEPS,
    RULE_STEPS,
    SMALL_LR_A,
    SMALL_LR_B,
    load_search,
    small_hparams,
    train_config,
)
from moeforge.search._training import rule_for
from moeforge.search._trials import best_trial


def _run(s, tmp_path, study=None):
    study = study or optuna.create_study(
        directions=s.directions, sampler=make_sampler(s), pruner=make_pruner(s)
    )
    calls = []
    fake = fake_evaluator(0)

    def evaluate(spec, seed, budget, out_dir, on_eval):
        calls.append((spec.moe_derived.m, spec.d_model, spec.n_layers, seed, budget, out_dir))
        return fake(spec, seed, budget, out_dir, on_eval)

    run_worker(s, study, evaluate, WorkerOptions(tmp_path, log=lambda _: None))
    return study, calls


def test_grid_ladder_trains_every_size_and_m_at_every_budget_once(make_search, tmp_path):
    s = make_search("  granularity: [1, 2]\n  size: [0.5, 1]", budget="[3.0e+9, 1.0e+9]", n_trials=100)
    assert s.budget.budgets == (1e9, 3e9) and s.budget.ladder
    study, calls = _run(s, tmp_path)
    records = [r for r in trial_records(study) if r.state == "COMPLETE"]
    units = {(r.params["m"], r.params["size"], r.params["budget"]) for r in records}
    assert units == set(itertools.product([1, 2], [0.5, 1.0], [1e9, 3e9]))
    assert len(calls) == len(records) == 8  # each unit trained once
    assert len({c[-1] for c in calls}) == 8  # its own folder: a spec at two budgets is two units
    for r in records:
        assert r.budget_flops == r.params["budget"]
        assert r.seeds == [0] and len(r.seed_values) == 1
        assert r.params_activated_non_embedding < r.params_activated < r.params_total
        assert r.spec_key.endswith(f"-C{r.budget_flops:.6g}")
    assert best_trial(study).params["budget"] == 3e9  # losses of different budgets do not compare
    # Running the search again trains nothing: every unit is done.
    _, again = _run(s, tmp_path, study)
    assert again == []


def test_random_ladder_queues_each_proposal_at_the_other_budgets(make_search, tmp_path):
    s = make_search(
        "  granularity: [1, 2, 4]", budget="[1.0e+9, 2.0e+9, 4.0e+9]", sampler="random", n_trials=6
    )
    study, calls = _run(s, tmp_path)
    done = [r for r in trial_records(study) if r.state == "COMPLETE" and r.reused_from is None]
    by_m: dict[int, set] = {}
    for r in done:
        by_m.setdefault(r.params["m"], set()).add(r.params["budget"])
    assert len(done) == 6
    assert all(b == {1e9, 2e9, 4e9} for b in by_m.values()), by_m  # two architectures, three budgets each


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        ("", "sampler.kind", "would learn the budget"),
        ("pruner: {kind: median}", "pruner.kind", "not comparable"),
    ],
)
def test_a_ladder_refuses_what_would_compare_budgets(make_search, extra, key, says):
    with pytest.raises(SpecError) as e:
        make_search(budget="[1.0e+9, 2.0e+9]", sampler="tpe" if not extra else "grid", extra=extra)
    assert any(p.key == key and says in p.message for p in e.value.problems), e.value.problems


def test_size_scales_to_its_targets_and_keeps_the_moe_shape(make_search):
    s = make_search("  granularity: [1, 4]\n  size: [0.25, 0.5, 1, 2, 4, 8]")
    base_n = account(trial_to_spec(s, {"m": 1, "size": 1.0})).params_activated_non_embedding
    for m, f in itertools.product([1, 4], s.space.size.factors):
        spec = trial_to_spec(s, {"m": m, "size": f})
        n = account(spec).params_activated_non_embedding
        assert abs(n / (f * base_n) - 1) <= s.space.size.tolerance + 0.02  # m adds a little router
        d = spec.moe_derived
        assert (
            d.m == m and d.top_k == m and d.routed_experts == 4 * m and d.shared_experts == 0
        )  # the base: 4, top-1
        assert (
            spec.d_model % spec.attention.n_heads == 0 and (spec.d_model // spec.attention.n_heads) % 2 == 0
        )
        assert d.expert_hidden * m == spec.ffn.hidden  # the paper form's standard width scales with d_model
    big, small = trial_to_spec(s, {"m": 1, "size": 8.0}), trial_to_spec(s, {"m": 1, "size": 0.25})
    assert big.n_layers > small.n_layers and big.d_model > small.d_model and big.attention.n_heads > 4


def test_size_targets_as_parameter_counts(make_search):
    s = make_search("  size: {activated_params: [40000, 160000]}")
    assert len(s.space.size.factors) == 2
    for target, f in zip((40000, 160000), s.space.size.factors, strict=True):
        n = account(trial_to_spec(s, {"size": f})).params_activated_non_embedding
        assert abs(n / target - 1) <= 0.2


def test_size_refuses_what_it_cannot_scale(make_search):
    with pytest.raises(SpecError) as e:
        make_search("  size: [1, 2]\n  width_depth: {n_layers: [1, 2]}")
    assert any("give size or width_depth" in p.message for p in e.value.problems)


def test_deepseek_hparams_follow_the_power_laws_and_are_recorded(make_search, tmp_path):
    s = make_search("  granularity: [1, 2]", budget="[1.0e+9, 1.0e+10]", extra="train: {hparams: deepseek}")
    spec = trial_to_spec(s, {"m": 1})
    for c in (1e9, 1e10):
        rule = rule_for(s, spec, c)
        assert rule["lr"] == pytest.approx(0.3118 * c**-0.125)
        tokens = c // account(spec).train_flops_per_token
        ideal = max(1, round(0.2920 * c**0.3271 / spec.seq_len))
        assert rule["batch_size"] == max(1, min(ideal, tokens // (spec.seq_len * MIN_STEPS)))
    study, _ = _run(s, tmp_path)
    for r in trial_records(study):
        if r.state == "COMPLETE":
            h = r.hparams
            assert h["rule"] == "deepseek" and h["lr"] == pytest.approx(0.3118 * r.budget_flops**-0.125)
    with pytest.raises(SpecError, match="set by train.hparams"):
        make_search(extra="train: {hparams: deepseek, lr: 0.001}")


def test_small_hparams_give_every_unit_of_the_shipped_study_enough_steps():
    """Computed, not trained: at every budget of the shipped study each candidate gets >= RULE_STEPS steps
    of its batch, the lr the fitted rule gives its N, and a warmup under a tenth of its smallest run; lr and
    warmup are the same at every budget, the batch never above DeepSeek's."""
    s = load_search("scaling")
    assert s.train.hparams == "small" and s.train.options["schedule"] == "wsd"
    grid = grid_space(s)
    budgets = grid.pop("budget")
    assert max(budgets) / min(budgets) >= 30
    units = 0
    for point in itertools.product(*grid.values()):
        try:
            spec = trial_to_spec(s, dict(zip(grid, point, strict=True)))
        except Infeasible:
            continue
        acc = account(spec)
        rules = [rule_for(s, spec, c) for c in budgets]
        for k in ("lr", "warmup_tokens"):
            assert len({r[k] for r in rules}) == 1
        lr = SMALL_LR_A * acc.params_activated_non_embedding**-SMALL_LR_B
        assert rules[0]["lr"] == pytest.approx(lr)
        assert rules[0]["warmup_tokens"] <= 0.1 * (min(budgets) // acc.train_flops_per_token)
        for c, rule in zip(budgets, rules, strict=True):
            cfg = train_config(s, budget_flops=c, seed=0, device="cpu", rule=rule)
            assert cfg.warmup_tokens == rule["warmup_tokens"] and cfg.schedule == "wsd"
            assert cfg.batch_size <= max(1, round(0.2920 * c**0.3271 / spec.seq_len))
            steps = (c // acc.train_flops_per_token) // (cfg.batch_size * spec.seq_len)
            assert steps >= RULE_STEPS, (point, c, steps)
            units += 1
    assert units == 5 * 5 * 4  # sizes x valid (m, K_s) pairs x budgets


def test_small_hparams_batch_is_deepseeks_unless_it_leaves_too_few_steps():
    seq = 64
    ds = round(0.2920 * 1e12**0.3271 / seq)  # DeepSeek B_opt at 1e12, in sequences
    smallest = (1e10, 10**6)
    assert small_hparams(10_000, 1e12, 10**8, smallest, seq)["batch_size"] == ds
    assert small_hparams(10_000, 1e12, 500 * seq * 3 + 5, smallest, seq)["batch_size"] == 3
    assert small_hparams(10_000, 1e12, 100 * seq, smallest, seq)["batch_size"] == 1  # all the steps there are
    big, small = (small_hparams(n, 1e12, 10**6, smallest, seq) for n in (80_000, 5_000))
    assert big["lr"] < small["lr"]  # bigger models want a smaller lr
    assert big["warmup_tokens"] == 80_000  # N tokens (Porian et al.)
    assert small_hparams(80_000, 1e12, 10**6, (1e10, 100_000), seq)["warmup_tokens"] == 10_000  # <= 10%
    assert (
        small_hparams(100, 1e12, 10**6, smallest, seq)["warmup_tokens"] == 10 * 9 * seq
    )  # >= 10 steps (9 sequences at 1e10)


def test_small_hparams_own_lr_batch_and_warmup(make_search, tmp_path):
    s = make_search("  granularity: [1, 2]", budget="[1.0e+9, 1.0e+10]", extra="train: {hparams: small}")
    spec = trial_to_spec(s, {"m": 1})
    one, ten = rule_for(s, spec, 1e9), rule_for(s, spec, 1e10)
    assert one["lr"] == ten["lr"] and one["warmup_tokens"] == ten["warmup_tokens"]
    study, _ = _run(s, tmp_path)
    n = 0
    for r in trial_records(study):
        if r.state == "COMPLETE":
            h = r.hparams
            assert h is not None and h["rule"] == "small"
            assert r.params_activated_non_embedding is not None
            assert h["lr"] == pytest.approx(SMALL_LR_A * r.params_activated_non_embedding**-SMALL_LR_B)
            n += 1
    assert n > 0
    for bad in ("lr: 0.001", "options: {warmup_tokens: 100}", "options: {warmup: 0.1}"):
        with pytest.raises(SpecError, match="set by train.hparams: small"):
            make_search(extra=f"train: {{hparams: small, {bad}}}")


def test_best_yaml_says_the_evidence(make_search, tmp_path):
    s = make_search(n_trials=3, extra="seeds: [0, 1, 2]")
    study, _ = _run(s, tmp_path)
    records = trial_records(study)
    best = best_trial(study)
    text = evidence(s, records, best.number)
    assert (
        f"trial {best.number}, val_loss = {best.values[0]:.4f} +- " in text
        and "over 3 seeds [0, 1, 2]" in text
    )
    assert "runner-up: trial" in text and "gap" in text
    one = make_search(n_trials=2, name="one")
    study1, _ = _run(one, tmp_path / "one")
    assert "1 seed: no noise estimate" in evidence(one, trial_records(study1), best_trial(study1).number)


def test_tie_rule():
    assert tied([1.0, 1.1, 0.9], [1.05, 1.15, 0.95]) is True
    assert tied([1.0, 1.001, 0.999], [1.5, 1.501, 1.499]) is False
    assert tied([1.0], [1.0, 1.1]) is None
