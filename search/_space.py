"""Trial parameters -> model spec, and the analytic feasibility checks that run before anything is built."""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any

from moeforge.compiler import ModelSpec, account, memory
from pydantic import ValidationError

from ._spec import CategoricalParam, FloatParam, IntParam, SearchSpec, hparams, train_config


class Infeasible(Exception):
    """A proposal that cannot become a valid spec; the message says why."""


# -------------------------------------------------------------------------------------------- suggest
def suggest(trial: Any, search: SearchSpec) -> dict[str, Any]:
    """Ask an Optuna trial for every parameter of the space; returns {name: value}."""
    space = search.space
    params: dict[str, Any] = {}
    for key, dist in space.params.items():
        if isinstance(dist, IntParam):
            r = dist.int
            params[key] = trial.suggest_int(key, r.low, r.high, step=r.step, log=r.log)
        elif isinstance(dist, FloatParam):
            f = dist.float
            params[key] = trial.suggest_float(key, f.low, f.high, step=f.step, log=f.log)
        else:
            params[key] = trial.suggest_categorical(key, list(dist.categorical))
    if space.granularity:
        params["m"] = trial.suggest_categorical("m", list(space.granularity))
    if space.shared:
        params["K_s"] = trial.suggest_categorical("K_s", list(space.shared))
    if space.width_depth:
        params["n_layers"] = trial.suggest_categorical("n_layers", list(space.width_depth.n_layers))
    if space.size:
        params["size"] = trial.suggest_categorical("size", list(space.size.factors or ()))
    if search.budget.ladder:
        params["budget"] = trial.suggest_categorical("budget", list(search.budget.budgets))
    return params


def trial_budget(search: SearchSpec, params: dict[str, Any]) -> float:
    """The training FLOPs (per seed) of a trial: its `budget` parameter on a ladder, else the one budget."""
    return float(params.get("budget", search.budget.budgets[0]))


def grid_space(search: SearchSpec) -> dict[str, list[Any]]:
    """Every parameter's values, for the grid sampler."""
    space = search.space
    out: dict[str, list[Any]] = {}
    for key, dist in space.params.items():
        if isinstance(dist, CategoricalParam):
            out[key] = list(dist.categorical)
        elif isinstance(dist, IntParam):
            out[key] = list(range(dist.int.low, dist.int.high + 1, dist.int.step))
        else:
            f = dist.float
            assert f.step is not None
            n = int(math.floor((f.high - f.low) / f.step + 1e-9))
            out[key] = [f.low + i * f.step for i in range(n + 1)]
    if space.granularity:
        out["m"] = list(space.granularity)
    if space.shared:
        out["K_s"] = list(space.shared)
    if space.width_depth:
        out["n_layers"] = list(space.width_depth.n_layers)
    if space.size:
        out["size"] = list(space.size.factors or ())
    if search.budget.ladder:
        out["budget"] = list(search.budget.budgets)
    return out


# --------------------------------------------------------------------------------------- trial_to_spec
def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def _validated(data: dict) -> ModelSpec:
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise Infeasible(f"invalid spec: {where}: {msg}" if where else f"invalid spec: {msg}") from None


_FINE_KEYS = ("routed_experts", "shared_experts", "top_k", "expert_hidden")


def trial_to_spec(search: SearchSpec, params: dict[str, Any]) -> ModelSpec:
    """The model spec of one trial: the base spec's data with the trial's changes, validated as a ModelSpec.

    Pure: the same search and params always give an equal (hashable) spec. Order: dotted `params` keys,
    then m and K_s on the base's paper form (its fine-grained numbers are dropped, they follow from it),
    then the width/depth trade.

    Raises:
        Infeasible: the changes do not make a valid spec, or no width keeps the FLOPs within tolerance.
    """
    assert isinstance(search.base, dict), "load the search with load_search, which resolves the base"
    data = copy.deepcopy(search.base)
    for key in search.space.params:
        _set(data, key, params[key])
    for name, field in (("m", "m"), ("K_s", "shared")):
        if name in params:
            moe = data.setdefault("moe", {})
            for k in _FINE_KEYS:
                moe.pop(k, None)
            moe.setdefault("paper", {})[field] = params[name]
    spec = _validated(data)
    wd = search.space.width_depth
    if wd is not None and params["n_layers"] != spec.n_layers:
        spec = _trade_width_for_depth(
            spec, data, params["n_layers"], wd.tolerance, _hidden_multiple(search, spec)
        )
    size = search.space.size
    if size is not None and params["size"] != 1:
        base_n = account(_validated(copy.deepcopy(search.base))).params_activated_non_embedding
        spec = scale_spec(spec, data, params["size"] * base_n, size.tolerance, _hidden_multiple(search, spec))
    return spec


def _hidden_multiple(search: SearchSpec, spec: ModelSpec) -> int:
    """FFN widths stay divisible by every segmentation factor the search may use."""
    ms = list(search.space.granularity or ())
    if spec.moe is not None and spec.moe.paper is not None:
        ms.append(spec.moe.paper.m)
    return math.lcm(*ms) if ms else 1


def _trade_width_for_depth(
    spec: ModelSpec, data: dict, n_layers: int, tolerance: float, multiple: int
) -> ModelSpec:
    target = account(spec).forward_flops_per_token
    d0, a = spec.d_model, spec.attention
    if a.kind == "mla":  # refused at load for the base; a trial's params could still switch to mla
        raise Infeasible(f"n_layers={n_layers}: width/depth trades need mha or gqa attention, not mla")
    quantum = 2 * a.n_heads  # heads stay; the head dim d_model / n_heads stays even for rope

    best: tuple[float, dict] | None = None
    for k in range(1, max(2, 8 * d0 // quantum) + 1):
        candidate = _rescaled(spec, data, n_layers, k * quantum, a.n_heads, multiple)
        try:
            flops = account(ModelSpec.model_validate(candidate)).forward_flops_per_token
        except ValidationError:
            continue
        miss = abs(flops / target - 1)
        if best is None or miss < best[0]:
            best = (miss, candidate)
    if best is None or best[0] > tolerance:
        miss_s = f"{best[0]:.1%}" if best else "no valid width"
        raise Infeasible(
            f"n_layers={n_layers}: no d_model keeps forward FLOPs/token within {tolerance:.0%} ({miss_s})"
        )
    return _validated(best[1])


def _rescaled(spec: ModelSpec, data: dict, n_layers: int, d: int, n_heads: int, multiple: int) -> dict:
    """`data` at depth `n_layers` and width `d` with `n_heads` heads (n_kv_heads keeps its ratio); every
    FFN and expert width scales with d (expert widths of the paper form to a multiple of `multiple`)."""
    d0, a, moe = spec.d_model, spec.attention, spec.moe
    assert a.kind != "mla"

    def scaled(width: int, q: int) -> int:
        return max(q, round(width * d / d0 / q) * q)

    out = copy.deepcopy(data)
    out["n_layers"] = n_layers
    out["d_model"] = d
    att = out.setdefault("attention", {})
    if n_heads != a.n_heads:
        att["n_heads"] = n_heads
        if a.kind == "gqa":
            att["n_kv_heads"] = max(1, n_heads * a.n_kv_heads // a.n_heads)
    if a.head_dim is not None:
        att["head_dim"] = d // n_heads
    out["ffn"]["hidden"] = scaled(spec.ffn.hidden, multiple)
    if moe is not None:
        m_out = out["moe"]
        if moe.paper is not None and moe.paper.standard_hidden:
            m_out["paper"]["standard_hidden"] = scaled(moe.paper.standard_hidden, multiple)
        if moe.paper is None and moe.expert_hidden:
            m_out["expert_hidden"] = scaled(moe.expert_hidden, 1)
        if moe.shared_hidden:
            m_out["shared_hidden"] = scaled(moe.shared_hidden, 1)
    return out


def _heads_for(d: int, ideal: float, group: int) -> int | None:
    """The head count nearest `ideal` (heads in proportion to d_model) that is a multiple of `group` and
    leaves an even head dim (for rope); None when there is none within a factor 1.5 of `ideal`."""
    counts = [h for h in range(group, d // 2 + 1, group) if d % h == 0 and (d // h) % 2 == 0]
    best = min(counts, key=lambda h: (abs(math.log(h / ideal)), h)) if counts else None
    return best if best is not None and abs(math.log(best / ideal)) <= math.log(1.5) else None


def scale_spec(spec: ModelSpec, data: dict, target: float, tolerance: float, multiple: int) -> ModelSpec:
    """`spec` scaled to about `target` activated non-embedding parameters (the `size` axis, see SizeAxis):
    depth by the cube root of the factor, then the d_model whose count comes closest, with
    the head count in proportion to d_model (the head dim stays close to the base's).

    Raises:
        Infeasible: mla attention, an explicit moe.layers list, or no shape within `tolerance`.
    """
    a = spec.attention
    factor = target / account(spec).params_activated_non_embedding
    if a.kind == "mla":
        raise Infeasible(f"size={factor:.3g}: scaling needs mha or gqa attention, not mla")
    if spec.moe is not None and spec.moe.layers is not None:
        raise Infeasible(f"size={factor:.3g}: cannot change the depth of a spec with an explicit moe.layers")
    depth = max(1, round(spec.n_layers * factor ** (1 / 3)))
    group = a.n_heads // a.n_kv_heads if a.kind == "gqa" else 1  # query heads per kv head stay
    step = math.lcm(8, 2 * group, max(8, spec.d_model // 64 // 8 * 8))  # about 1/64 of the base width
    best: tuple[float, float, dict] | None = None  # (score, miss, data)
    # A small model's widths come in coarse steps (one head at a time): a depth next to the cube-root
    # one may land much closer, at a price of 15% miss per layer of difference (N is recorded exactly; the shape should stay regular).
    for n_layers in sorted({max(1, depth - 1), depth, depth + 1}):
        for d in range(step, 64 * spec.d_model + 1, step):
            h = _heads_for(d, a.n_heads * d / spec.d_model, group)
            if h is None:
                continue
            candidate = _rescaled(spec, data, n_layers, d, h, multiple)
            try:
                n = account(ModelSpec.model_validate(candidate)).params_activated_non_embedding
            except ValidationError:
                continue
            miss = abs(math.log(n / target))
            score = miss + 0.15 * abs(n_layers - depth)
            if best is None or score < best[0]:
                best = (score, miss, candidate)
            if n > target:
                break  # counts grow with the head count: past the target, nothing gets closer
    if best is None or math.exp(best[1]) - 1 > tolerance:
        miss_s = f"{math.exp(best[1]) - 1:.1%}" if best else "no valid width"
        raise Infeasible(
            f"size={factor:.3g}: no shape reaches {target:,.0f} parameters within {tolerance:.0%} ({miss_s})"
        )
    return _validated(best[2])


# ---------------------------------------------------------------------------------------- budget floor
class BudgetTooSmall(ValueError):
    """Every candidate of a search is below the budget floor (runtime MIN_STEPS): nothing would train."""


MAX_PREFLIGHT = 4096
"""`check_budgets` enumerates a space of at most this many points (categorical, int, stepped floats)."""


def budget_problem(search: SearchSpec, spec: ModelSpec, budget: float) -> str | None:
    """Why `spec` at `budget` trains too few optimizer steps (runtime `budget_problem`, with the batch this
    trial would use), or None."""
    from moeforge.runtime import budget_problem as too_small

    fpt = account(spec).train_flops_per_token
    rule = hparams(search, budget, spec.seq_len, int(budget // fpt), spec)
    cfg = train_config(search, budget_flops=budget, seed=search.seeds[0], device="cpu", rule=rule)
    why = too_small(cfg, spec.seq_len, fpt)
    return f"budget too small: train_flops {why}" if why else None


def check_budgets(search: SearchSpec) -> None:
    """Refuse a search whose every candidate is below the budget floor, before anything trains.

    Only a space that can be enumerated (see MAX_PREFLIGHT) is checked; in any other, each proposal below
    the floor is infeasible on its own.

    Raises:
        BudgetTooSmall: naming the smallest budget at which some candidate would train.
    """
    try:
        grid = grid_space(search)
    except AssertionError:  # a float range without a step
        return
    if math.prod(len(v) for v in grid.values()) > MAX_PREFLIGHT:
        return
    import itertools

    cheapest: tuple[float, dict[str, Any], str] | None = None
    for point in itertools.product(*grid.values()):
        params = dict(zip(grid, point, strict=True))
        try:
            spec = trial_to_spec(search, params)
        except Infeasible:
            continue
        budget = trial_budget(search, params)
        why = budget_problem(search, spec, budget)
        if why is None:
            return
        floor = _floor(search, spec, budget)
        if cheapest is None or floor < cheapest[0]:
            cheapest = (floor, params, why)
    if cheapest is not None:
        label = ", ".join(f"{k}={v}" for k, v in cheapest[1].items())
        raise BudgetTooSmall(
            f"every candidate of {search.name!r} would train too few steps; the cheapest ({label}): {cheapest[2]}"
        )


def _floor(search: SearchSpec, spec: ModelSpec, budget: float) -> float:
    from moeforge.runtime import budget_floor

    fpt = account(spec).train_flops_per_token
    rule = hparams(search, budget, spec.seq_len, int(budget // fpt), spec)
    cfg = train_config(search, budget_flops=budget, seed=search.seeds[0], device="cpu", rule=rule)
    return budget_floor(cfg, spec.seq_len, fpt)[1]


# ---------------------------------------------------------------------------------------- constraints
def constraint_values(search: SearchSpec, spec: ModelSpec) -> list[float]:
    """One number per constraint, Optuna's convention: <= 0 feasible, > 0 the relative violation."""
    c = search.constraints
    acc = account(spec)
    out = []
    for limit, value in (
        (c.max_params_total, acc.params_total),
        (c.max_params_activated, acc.params_activated),
        (c.max_forward_flops_per_token, acc.forward_flops_per_token),
        (c.max_memory_bytes, memory_bytes(search, spec)),
    ):
        if limit is not None:
            out.append(value / limit - 1.0)
    return out


def memory_bytes(search: SearchSpec, spec: ModelSpec) -> int:
    """Training state plus activations of one batch (batch_size defaults to 1 sequence here)."""
    mem = memory(spec, search.constraints.memory_dtype)
    batch = search.train.batch_size or 1
    return mem.train_state_bytes + mem.activation_bytes_per_token * batch * spec.seq_len


def spec_key(spec: ModelSpec) -> str:
    """A digest that is equal for equal specs, in every process (hash() is salted per process)."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def describe(spec: ModelSpec) -> dict[str, Any]:
    """The numbers trials.json records about a trial's spec."""
    acc = account(spec)
    d = spec.moe_derived
    return {
        "d_model": spec.d_model,
        "n_layers": spec.n_layers,
        "routed_experts": d.routed_experts if d else None,
        "shared_experts": d.shared_experts if d else None,
        "top_k": d.top_k if d else None,
        "expert_hidden": d.expert_hidden if d else None,
        "m": d.m if d else None,
        "params_total": acc.params_total,
        "params_activated": acc.params_activated,
        "params_non_embedding": acc.params_non_embedding,
        "params_activated_non_embedding": acc.params_activated_non_embedding,
        "forward_flops_per_token": acc.forward_flops_per_token,
        "train_flops_per_token": acc.train_flops_per_token,
    }
