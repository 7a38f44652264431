"""trial_to_spec is pure and keeps DeepSeekMoE's fixed quantities fixed; constraints are analytic."""

import copy

import pytest
from moeforge.compiler import account
from moeforge.search import Infeasible, constraint_values, grid_space, load_search, spec_key, trial_to_spec


def test_trial_to_spec_is_pure(make_search):
    s = make_search()
    base_before = copy.deepcopy(s.base)
    a = trial_to_spec(s, {"m": 2, "K_s": 1})
    b = trial_to_spec(s, {"m": 2, "K_s": 1})
    assert a == b and hash(a) == hash(b) and spec_key(a) == spec_key(b)
    assert s.base == base_before  # the search's base data is not mutated
    assert trial_to_spec(s, {"m": 4, "K_s": 1}) != a


def test_granularity_and_shared_keep_expert_params_fixed(make_search):
    s = make_search()
    ref = account(trial_to_spec(s, {"m": 1, "K_s": 0}))
    for m, ks in ((2, 0), (2, 1), (4, 0), (4, 1)):
        spec = trial_to_spec(s, {"m": m, "K_s": ks})
        d = spec.moe_derived
        assert (d.routed_experts, d.shared_experts, d.top_k) == (4 * m - ks, ks, m - ks)
        acc = account(spec)
        expert_total = acc.params["routed_experts"] + acc.params["shared_experts"]
        expert_active = acc.activated["routed_experts"] + acc.activated["shared_experts"]
        assert expert_total == ref.params["routed_experts"]
        assert expert_active == ref.activated["routed_experts"]
        # only the router grows, one row per routed expert
        assert acc.params_total - ref.params_total == acc.params["router"] - ref.params["router"]


def test_invalid_proposal_is_infeasible(make_search):
    s = make_search()
    with pytest.raises(Infeasible, match="no routed expert"):
        trial_to_spec(s, {"m": 1, "K_s": 1})


def test_width_depth_keeps_flops_within_tolerance(make_search):
    s = make_search("  width_depth: {n_layers: [1, 2, 4], tolerance: 0.15}")
    target = account(trial_to_spec(s, {"n_layers": 2})).forward_flops_per_token
    widths = set()
    for n in (1, 4):
        spec = trial_to_spec(s, {"n_layers": n})
        assert spec.n_layers == n and spec.attention.n_heads == 4
        assert abs(account(spec).forward_flops_per_token / target - 1) <= 0.15
        widths.add(spec.d_model)
    assert len(widths) == 2  # depth really traded for width
    tight = make_search("  width_depth: {n_layers: [7], tolerance: 0.001}", name="tight")
    with pytest.raises(Infeasible, match="n_layers=7"):
        trial_to_spec(tight, {"n_layers": 7})


def test_width_depth_refuses_mla_attention(make_search, tmp_path):
    from moeforge.compiler import SpecError, load_spec

    path = tmp_path / "mla.yaml"
    path.write_text(
        "base: deepseek-v2-lite\nspace:\n  width_depth: {n_layers: [2, 4]}\nbudget: {train_flops: 1.0e+9}\n"
        "n_trials: 1\n"
    )
    with pytest.raises(SpecError) as e:
        load_search(path)
    [problem] = e.value.problems
    assert str(problem).startswith(f"{path}:3:3: space.width_depth: cannot trade width for depth with mla")
    assert "use an mha or gqa base" in problem.message
    # a trial whose spec has MLA (say through its params) is infeasible, not silently mis-scaled
    s = make_search("  width_depth: {n_layers: [1, 2]}")
    mla = load_spec("deepseek-v2-lite").model_dump(mode="json")
    with pytest.raises(Infeasible, match="need mha or gqa"):
        trial_to_spec(s.model_copy(update={"base": mla}), {"n_layers": 1})


def test_dotted_params_and_grid(make_search):
    s = make_search(
        "  params:\n    moe.balance.expert_alpha: {categorical: [0.0, 0.01]}\n    d_model: {int: {low: 32, high: 64, step: 32}}"
    )
    spec = trial_to_spec(s, {"moe.balance.expert_alpha": 0.0, "d_model": 32})
    assert spec.moe.balance.expert_alpha == 0.0 and spec.d_model == 32
    assert grid_space(s) == {"moe.balance.expert_alpha": [0.0, 0.01], "d_model": [32, 64]}


def test_constraint_values_sign(make_search):
    s = make_search(extra="constraints: {max_params_total: 263200, max_forward_flops_per_token: 1000000000}")
    small = trial_to_spec(s, {"m": 1, "K_s": 0})
    big = trial_to_spec(s, {"m": 4, "K_s": 0})
    assert all(v <= 0 for v in constraint_values(s, small))
    big_values = constraint_values(s, big)
    assert big_values[0] > 0 and big_values[1] <= 0


@pytest.mark.parametrize("name", ["quickstart", "granularity"])
def test_shipped_searches_load_and_make_specs(name):
    from moeforge.search import grid_space as gs

    s = load_search(name)
    grid = gs(s)
    assert grid
    import itertools

    made = 0
    for combo in itertools.product(*grid.values()):
        try:
            trial_to_spec(s, dict(zip(grid, combo, strict=True)))
            made += 1
        except Infeasible:
            pass
    assert made >= 4


# ---------------------------------------------------------------------------------------- budget floor
@pytest.fixture
def floor(monkeypatch):
    """The budget floor users get (the suite lifts it in tests/conftest.py)."""
    monkeypatch.delenv("MOEFORGE_MIN_STEPS", raising=False)


def test_budget_floor_is_twenty_full_batches_at_the_candidates_batch(make_search, floor):
    from moeforge.search._space import budget_problem

    s = make_search(extra="train: {batch_size: 4}")
    spec = trial_to_spec(s, {"m": 2, "K_s": 0})
    fpt = account(spec).train_flops_per_token
    need = 20 * 4 * spec.seq_len  # MIN_STEPS full batches: the 5% warmup gets one step of its own
    assert budget_problem(s, spec, float(need * fpt)) is None
    why = budget_problem(s, spec, float(need * fpt - 1))
    assert why is not None and f"{need - 1:,} tokens" in why and "20 optimizer steps of 4 x 128" in why


@pytest.mark.parametrize("name", ["quickstart", "granularity", "scaling", "own-data"])
def test_shipped_searches_are_above_the_floor(name, floor):
    """Computed, not trained: every candidate of a shipped search at its own budget trains >= 20 steps."""
    import itertools

    from moeforge.search._space import budget_problem, check_budgets, trial_budget

    s = load_search(name)
    check_budgets(s)
    grid = grid_space(s)
    n = 0
    for point in itertools.product(*grid.values()):
        params = dict(zip(grid, point, strict=True))
        try:
            spec = trial_to_spec(s, params)
        except Infeasible:
            continue
        n += 1
        assert budget_problem(s, spec, trial_budget(s, params)) is None, params
    assert n >= 5


def test_search_below_the_floor_stops_before_anything_is_made(make_search, floor, tmp_path):
    from moeforge.search import RunConfig, run_search
    from moeforge.search._space import BudgetTooSmall

    s = make_search(budget="1.0e+6")
    with pytest.raises(BudgetTooSmall, match=r"the smallest budget that trains them is 3\.\d+e\+10"):
        run_search(s, RunConfig(tmp_path / "run"), evaluate=lambda *a: pytest.fail("trained"))
    assert not (tmp_path / "run").exists()


def test_candidate_below_the_floor_is_infeasible_with_its_reason(make_search, floor, tmp_path):
    """On a budget ladder the small budget's candidates are recorded infeasible (Optuna constraints) and
    never trained; the large budget's train."""
    import json

    from fakes import fake_evaluator
    from moeforge.search import RunConfig, run_search

    s = make_search(
        space="  granularity: [1, 2]",
        budget="[1.0e+6, 1.0e+12]",
        n_trials=4,
        extra="train: {batch_size: 4}",
    )
    trained = []
    fake = fake_evaluator()

    def evaluate(spec, seed, budget, out_dir, on_eval):
        trained.append(budget)
        return fake(spec, seed, budget, out_dir, on_eval)

    summary = run_search(s, RunConfig(tmp_path / "run", plots=False), evaluate=evaluate)
    assert summary.complete == 2 and set(trained) == {1e12}
    records = json.loads((tmp_path / "run" / "trials.json").read_text())
    records = records["trials"] if isinstance(records, dict) else records
    small = [r for r in records if r["params"].get("budget") == 1e6]
    assert len(small) == 2 and all("budget too small" in r["infeasible"] for r in small)
    assert all(r["constraints"][0] > 0 for r in small)
