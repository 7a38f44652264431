"""The search spec: what to search, under which budget, with which sampler.

One frozen pydantic model per YAML section, like model specs; the JSON Schema is
``specs/schema/search.schema.json`` (``moeforge schema --search``). A search spec names a base model
spec and a space of changes to it; every trial's model spec comes from `trial_to_spec` (``_space.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    Tag,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue

if TYPE_CHECKING:
    from moeforge.compiler import Locs, ModelSpec, Problem
    from moeforge.runtime import TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


# ------------------------------------------------------------------------------------- distributions
class IntRange(_Section):
    low: int
    """Smallest value (inclusive)."""
    high: int
    """Largest value (inclusive)."""
    step: int = Field(1, gt=0)
    """Spacing of the values (ignored with log)."""
    log: bool = False
    """Sample on a log scale (low must be >= 1)."""

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.high < self.low:
            raise ValueError(f"high: {self.high} < low {self.low}")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log: a log range needs low >= 1 and step 1")
        return self


class FloatRange(_Section):
    low: float
    """Smallest value (inclusive)."""
    high: float
    """Largest value (inclusive)."""
    step: float | None = Field(None, gt=0)
    """Spacing of the values; null for a continuous range."""
    log: bool = False
    """Sample on a log scale (low must be > 0, no step)."""

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.high < self.low:
            raise ValueError(f"high: {self.high} < low {self.low}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: a log range needs low > 0 and no step")
        return self


class IntParam(_Section):
    int: IntRange
    """An integer range: {low, high, step, log}."""


class FloatParam(_Section):
    float: FloatRange
    """A float range: {low, high, step, log}."""


Scalar = bool | int | float | str | None


class CategoricalParam(_Section):
    categorical: tuple[Scalar, ...] = Field(min_length=1)
    """A list of choices (numbers, strings, booleans or null)."""


def _param_kind(v: Any) -> str | None:
    if isinstance(v, dict) and len(v) == 1:
        return next(iter(v))
    if isinstance(v, IntParam | FloatParam | CategoricalParam):
        return next(iter(type(v).model_fields))
    return None


def _choices_shorthand(v: Any) -> Any:
    """``[2, 4]`` is ``{categorical: [2, 4]}``, as sweep configs elsewhere write it."""
    # What this hook returns is validated as Python data, where a strict tuple field takes no list: the
    # choices become a tuple, in the shorthand and in the long form alike.
    if isinstance(v, list | tuple):
        return {"categorical": tuple(v)}
    if isinstance(v, dict) and isinstance(v.get("categorical"), list):
        return {**v, "categorical": tuple(v["categorical"])}
    return v


class _ChoicesShorthandSchema:
    """Adds the plain-list shorthand to the distribution's JSON Schema (editors accept ``top_k: [2, 4]``)."""

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        choices = CategoricalParam.model_json_schema()["properties"]["categorical"]
        shorthand = {**choices, "title": "Choices", "description": "Shorthand for {categorical: [...]}."}
        out["oneOf"] = [*out["oneOf"], shorthand]
        return out


ParamDist = Annotated[
    Annotated[IntParam, Tag("int")]
    | Annotated[FloatParam, Tag("float")]
    | Annotated[CategoricalParam, Tag("categorical")],
    Discriminator(
        _param_kind,
        custom_error_type="param_kind",
        custom_error_message="expected a list of choices [a, b, ...], or one of {int: {low, high}}, "
        "{float: {low, high}}, {categorical: [...]}",
    ),
    BeforeValidator(_choices_shorthand),
    _ChoicesShorthandSchema(),
]
"""One parameter's distribution; a plain list is categorical."""


# ---------------------------------------------------------------------------------------------- space
class WidthDepth(_Section):
    """Trade depth for width at fixed forward FLOPs per token (mha or gqa attention only).

    For each depth in `n_layers`, d_model is the multiple of 2 x n_heads whose forward FLOPs per token
    come closest to the candidate's at the base depth and width; the head count stays (head dim =
    d_model / n_heads), and every FFN and expert width scales with d_model (rounded to a multiple of every
    segmentation m in the space). A depth whose best width misses by more than `tolerance` is infeasible.
    MLA attention is refused when the search loads: its latent ranks and its nope/rope/value head dims are
    separate widths with no one rule to scale them by.
    """

    n_layers: tuple[int, ...] = Field(min_length=1)
    """Depths to try (the trial parameter `n_layers`)."""
    tolerance: float = Field(0.1, gt=0, le=1)
    """Largest relative difference of forward FLOPs per token from the base's."""

    @model_validator(mode="after")
    def _positive(self) -> WidthDepth:
        if any(n < 1 for n in self.n_layers):
            raise ValueError(f"n_layers: depths must be >= 1, got {list(self.n_layers)}")
        return self


def _factors_shorthand(v: Any) -> Any:
    """``size: [0.5, 1, 2]`` is ``size: {factors: [0.5, 1, 2]}``."""
    # Validated as Python data after this hook, where a strict tuple field takes no list.
    if isinstance(v, list | tuple):
        return {"factors": tuple(v)}
    if isinstance(v, dict):
        return {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
    return v


class _FactorsShorthandSchema:
    """Adds the plain-list shorthand to the size axis's JSON Schema (editors accept ``size: [0.5, 1, 2]``)."""

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        return {"anyOf": [out, {"type": "array", "items": {"type": "number"}, "minItems": 1}]}


class SizeAxis(_Section):
    """Scale the whole model (trial parameter `size`, a factor of the base's activated non-embedding
    parameters), so one budget gives an IsoFLOP profile: loss against N at fixed compute.

    For a factor f, n_layers becomes round(base n_layers x f^(1/3)) (at least 1) and d_model the multiple
    of the head dim whose activated non-embedding parameter count comes closest to f x the base's; the head
    dim stays, so the head counts scale with d_model (n_kv_heads keeps its ratio), and every FFN and
    expert width scales with d_model (rounded to a multiple of every segmentation m in the space). Held
    fixed: m, K_s, top-k, the expert counts, vocab_size, seq_len. A factor no shape reaches within
    `tolerance` is infeasible. Needs mha or gqa attention, and no explicit `moe.layers` list.
    """

    factors: tuple[float, ...] | None = Field(None, min_length=1)
    """Scale factors of activated non-embedding parameters (1 is the base)."""
    activated_params: tuple[int, ...] | None = Field(None, min_length=1)
    """Or target activated non-embedding parameter counts; each becomes the factor target / the base's."""
    tolerance: float = Field(0.2, gt=0, le=1)
    """Largest relative miss of the target parameter count."""

    @model_validator(mode="after")
    def _one_form(self) -> SizeAxis:
        if (self.factors is None) == (self.activated_params is None):
            raise ValueError("give one of factors: [0.5, 1, 2] or activated_params: [1e5, 2e5]")
        if any(f <= 0 for f in self.factors or ()) or any(n <= 0 for n in self.activated_params or ()):
            raise ValueError("sizes must be > 0")
        return self


class SpaceSpec(_Section):
    params: dict[str, ParamDist] = {}
    """Any model spec key by dotted path (``moe.balance.expert_alpha``) -> {int|float: {...}}, {categorical:
    [...]}, or a plain list of choices (``moe.top_k: [2, 4]`` is ``{categorical: [2, 4]}``)."""
    granularity: tuple[int, ...] | None = Field(None, min_length=1)
    """Segmentation factors m to try (trial parameter `m`; DeepSeekMoE section 3.1), set as moe.paper.m on
    the base's paper form: mN - K_s routed experts of width standard/m, routed top-(mK - K_s).
    Held fixed: N, K, K_s (unless `shared` varies it), the standard expert width and everything outside
    the MoE experts, so total and activated expert parameters and expert FLOPs per token are the same for
    every m; only the router changes (d_model x routed experts per MoE layer)."""
    shared: tuple[int, ...] | None = Field(None, min_length=1)
    """Shared expert counts K_s to try (trial parameter `K_s`; section 3.2), set as moe.paper.shared: K_s of
    the mK activated fine-grained experts become always-active shared ones, leaving routed top-(mK - K_s)
    of mN - K_s. Held fixed: N, K, m (unless `granularity` varies it), the expert width standard/m and
    everything outside the MoE experts, so total and activated expert parameters and expert FLOPs per token
    are the same for every K_s; only the router shrinks. K_s >= mK leaves no routed expert: infeasible."""
    width_depth: WidthDepth | None = None
    """Depths to try (trial parameter `n_layers`), each at the d_model that keeps forward FLOPs per token
    within `tolerance` of the trial's spec at the base depth. Held fixed: those FLOPs, the head counts
    (n_heads, n_kv_heads; the head dim follows d_model), vocab_size, seq_len and the MoE structure (expert
    counts, top-k, m, K_s, which layers are MoE); FFN and expert widths scale with d_model, so parameter
    counts change. Needs mha or gqa attention."""
    size: Annotated[SizeAxis, BeforeValidator(_factors_shorthand), _FactorsShorthandSchema()] | None = None
    """Model sizes to try (trial parameter `size`): a list of scale factors of the base's activated
    non-embedding parameters, or {activated_params: [...]} targets; see SizeAxis. With a budget ladder,
    every size at every budget gives IsoFLOP profiles for `moeforge scaling fit`."""

    @model_validator(mode="after")
    def _not_empty(self) -> SpaceSpec:
        if not (self.params or self.granularity or self.shared or self.width_depth or self.size):
            raise ValueError(
                "params: the space is empty; give params, granularity, shared, width_depth or size"
            )
        if self.granularity and any(m < 1 for m in self.granularity):
            raise ValueError(f"granularity: m must be >= 1, got {list(self.granularity)}")
        if self.shared and any(k < 0 for k in self.shared):
            raise ValueError(f"shared: K_s must be >= 0, got {list(self.shared)}")
        reserved = {"m", "K_s", "n_layers", "size", "budget"} & set(self.params)
        if reserved:
            raise ValueError(
                f"params: {sorted(reserved)} name an axis; use granularity/shared/width_depth/size"
            )
        if self.size and self.width_depth:
            raise ValueError("size: scales depth itself; give size or width_depth, not both")
        return self

    @property
    def names(self) -> list[str]:
        """Trial parameter names, in suggestion order."""
        out = list(self.params)
        out += ["m"] if self.granularity else []
        out += ["K_s"] if self.shared else []
        out += ["n_layers"] if self.width_depth else []
        out += ["size"] if self.size else []
        return out


# ------------------------------------------------------------------------------------ constraints etc.
class Constraints(_Section):
    """Hard limits, checked analytically on each proposal before anything is built."""

    max_params_total: int | None = Field(None, gt=0)
    """Most parameters in total (embeddings and head included)."""
    max_params_activated: int | None = Field(None, gt=0)
    """Most parameters activated per token."""
    max_forward_flops_per_token: int | None = Field(None, gt=0)
    """Most forward FLOPs per token at seq_len (2 per multiply-add, full attention square)."""
    max_memory_bytes: int | None = Field(None, gt=0)
    """Most training memory: AdamW state at `memory_dtype` plus activations of one batch (estimate)."""
    memory_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype for the memory estimate."""


class Budget(_Section):
    train_flops: Annotated[
        Annotated[float, Tag("one")] | Annotated[tuple[float, ...], Tag("ladder")],
        Discriminator(lambda v: "ladder" if isinstance(v, list | tuple) else "one"),
    ]
    """Training FLOPs per trial (per seed); each candidate trains for train_flops / its own training
    FLOPs per token tokens, so big and small candidates get the same compute. A list is an IsoFLOP
    ladder (``[1e11, 3e11, 1e12]``): every proposed architecture trains at every budget, one trial each
    (trial parameter `budget`), for `moeforge scaling fit`."""

    @model_validator(mode="after")
    def _positive(self) -> Budget:
        if not self.budgets:
            raise ValueError(
                "train_flops: an empty list; give a budget (1.0e+12) or a ladder ([1.0e+11, 1.0e+12])"
            )
        if any(not 0 < c < float("inf") for c in self.budgets):
            raise ValueError(f"train_flops: budgets must be finite and > 0, got {list(self.budgets)}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"train_flops: {list(self.budgets)} repeats a budget")
        return self

    @property
    def budgets(self) -> tuple[float, ...]:
        """The budgets, smallest first (one for a plain number)."""
        c = self.train_flops
        return tuple(sorted(c)) if isinstance(c, tuple) else (float(c),)

    @property
    def ladder(self) -> bool:
        return len(self.budgets) > 1

    def label(self) -> str:
        """``1e+12`` or ``1e+11, 3e+11, 1e+12``, for log lines."""
        return ", ".join(f"{c:.3g}" for c in self.budgets)


class Objective(_Section):
    metric: Literal["val_loss", "val_bits_per_byte"] = "val_loss"
    """Minimized at the end of each trial's budget."""
    params_total: bool = False
    """Also minimize total parameters (multi-objective: a Pareto front; no pruning)."""


class SamplerSpec(_Section):
    kind: Literal["tpe", "random", "grid", "gp", "nsga2"] = "tpe"
    """Optuna sampler. grid runs every combination (ranges need a step); gp and tpe learn from results."""
    seed: int = 0
    """Sampler seed; worker i of a run uses seed + i."""
    n_startup_trials: int = Field(4, ge=0)
    """tpe/gp: random proposals before the model takes over."""


class PrunerSpec(_Section):
    kind: Literal["none", "median", "hyperband"] = "none"
    """Stop a trial early when it does worse than others at the same fraction of its own budget."""
    n_startup_trials: int = Field(2, ge=0)
    """median: trials that finish before any pruning."""
    n_warmup_steps: int = Field(1, ge=0)
    """median: evaluation points of each trial before it can be pruned."""


class TrainSettings(_Section):
    """Settings passed to the trainer (moeforge.runtime.TrainConfig); budget and seed come from the search."""

    device: str = "auto"
    """auto (cuda when there is one), cpu, cuda, cuda:1, ..."""
    batch_size: int | None = Field(None, gt=0)
    """Sequences per step; default the trainer's."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; default the trainer's."""
    eval_points: int = Field(4, ge=1, le=1000)
    """Validation evaluations per trial at equal fractions of its budget; the pruner sees each."""
    cpu_threads: int | None = Field(None, gt=0)
    """torch threads on CPU; 1 is fastest for tiny models on a busy machine and for several workers."""
    data: str | None = None
    """Corpus: null for the bundled one, or a path (see `moeforge.runtime.load_corpus`)."""
    options: dict[str, Scalar] = {}
    """Other TrainConfig fields by name (e.g. warmup, eval_tokens), checked against TrainConfig on load."""
    hparams: Literal["fixed", "deepseek", "small"] = "fixed"
    """Learning rate and batch size: `fixed` (train.lr / train.batch_size, or the trainer's defaults, at
    every budget); `deepseek`, DeepSeek LLM's compute-optimal power laws (arXiv 2401.02954, section 3.1:
    lr = 0.3118 C^-0.1250, batch = 0.2920 C^0.3271 tokens; fitted on dense models at 1e17-3e20 FLOPs, so at
    CPU scale a starting point, not a truth), the batch rounded to whole sequences and kept to at most
    1/MIN_STEPS of the run's tokens; or `small`, for tiny models (see `small_hparams`): DeepSeek's batch
    kept small enough for at least RULE_STEPS optimizer steps, a short warmup in tokens (`warmup_tokens`)
    and lr = SMALL_LR_A N^-SMALL_LR_B in the activated non-embedding parameters N, fitted by
    `benchmarks/lr_sweep.py`; lr and warmup are the same at every budget. Every trial records the values
    it used (`hparams`)."""
    devices_per_trial: int = Field(1, ge=1, le=1024)
    """Devices (processes) per training run: k > 1 runs each trial as a torchrun group of k processes
    (DDP over the global batch, `moeforge.runtime.train`), and `--workers auto` makes one worker per k
    visible GPUs (on CPU, per k x cpu_threads cores). Evaluations reach the search when the run ends, so
    no pruner."""
    branch_cooldowns: bool = False
    """On a budget ladder with `options: {schedule: wsd, warmup_tokens: N}`: train each architecture and seed
    once through the warmup and stable phase, and branch each budget's cooldown off it where that budget's
    cooldown starts (Hägele et al. 2024, arXiv 2405.18392), the same losses as separate WSD runs for less
    compute. Each budget stays its own trial and folder; the shared stable run lives in
    trials/<spec key>-stable-<settings>/seed-<seed>."""
    keep_checkpoints: Literal["best", "all", "none"] = "best"
    """Which finished trials keep their trained weights (trials/<spec key>/seed-*/checkpoint): the best
    so far (disk stays bounded; `moeforge export hf RUN_DIR` exports it), all, or none. Unfinished and
    retried trials always keep theirs, to resume from."""


# ---------------------------------------------------------------------------------------------- search
class SearchSpec(_Section):
    """A budget-constrained architecture search."""

    name: str = Field("search", min_length=1, max_length=200, pattern=r"^[\w.-]+$")
    """Names the run dir and the Optuna study."""
    base: str | dict[str, Any]
    """The model spec every trial changes: a path (relative to this file), a shipped name, or a mapping."""
    space: SpaceSpec
    """What the trials vary."""
    constraints: Constraints = Constraints()
    """Analytic limits; violating proposals are recorded as infeasible and not trained."""
    budget: Budget
    """Training compute per trial."""
    objective: Objective = Objective()
    """What is minimized."""
    sampler: SamplerSpec = SamplerSpec()
    """How proposals are made."""
    pruner: PrunerSpec = PrunerSpec()
    """Early stopping of poor trials."""
    n_trials: int = Field(gt=0, le=100_000)
    """Trials that train (infeasible and repeated proposals do not count), across all workers."""
    timeout_s: float | None = Field(None, gt=0)
    """Stop proposing new trials after this many seconds (per worker)."""
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    """Training seeds: each configuration trains once per seed; the value is the mean."""
    train: TrainSettings = TrainSettings()
    """Trainer settings."""

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        if self.objective.params_total and self.pruner.kind != "none":
            raise ValueError("pruner.kind: pruning needs a single objective; use none with params_total")
        if self.sampler.kind == "grid":
            for key, dist in self.space.params.items():
                if isinstance(dist, FloatParam) and dist.float.step is None:
                    raise ValueError(
                        f"space.params.{key}: the grid sampler needs a step or categorical choices"
                    )
                if (
                    isinstance(dist, IntParam | FloatParam)
                    and getattr(dist, next(iter(type(dist).model_fields))).log
                ):
                    raise ValueError(f"space.params.{key}: the grid sampler cannot enumerate a log range")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {list(self.seeds)} repeats a seed")
        if self.budget.ladder and self.sampler.kind not in ("grid", "random"):
            raise ValueError(
                f"sampler.kind: a budget ladder trains every proposal at every budget, so {self.sampler.kind} "
                "would learn the budget, not the design; use grid or random"
            )
        if self.train.devices_per_trial > 1 and self.pruner.kind != "none":
            raise ValueError(
                "pruner.kind: a trial on several devices reports its evaluations when it ends; use none"
            )
        if self.budget.ladder and self.pruner.kind != "none":
            raise ValueError(
                "pruner.kind: trials of a budget ladder differ in budget, not comparable; use none"
            )
        if self.train.branch_cooldowns:
            _check_branching(self)
        if self.train.hparams != "fixed":
            owned = ("lr", "batch_size") + (
                ("warmup", "warmup_tokens") if self.train.hparams == "small" else ()
            )
            for k in owned:
                if getattr(self.train, k, None) is not None or k in self.train.options:
                    raise ValueError(
                        f"train.{k}: set by train.hparams: {self.train.hparams}; remove it or use fixed"
                    )
        return self

    @property
    def directions(self) -> list[Literal["minimize", "maximize"]]:
        return ["minimize", "minimize"] if self.objective.params_total else ["minimize"]


def _check_branching(search: SearchSpec) -> None:
    """`train.branch_cooldowns` needs budgets to branch and a stable phase that is the same for each."""
    opts = search.train.options
    if not search.budget.ladder:
        raise ValueError(
            "train.branch_cooldowns: needs a budget ladder (budget.train_flops: [C1, C2, ...]) to branch"
        )
    if opts.get("schedule") != "wsd":
        raise ValueError(
            "train.branch_cooldowns: needs train.options.schedule: wsd (the stable phase is what budgets share)"
        )
    if opts.get("warmup_tokens") is None:
        raise ValueError(
            "train.branch_cooldowns: needs train.options.warmup_tokens (a warmup in tokens; a fraction of the "
            "run would make each budget's stable phase differ)"
        )
    if opts.get("cooldown") == 0:
        raise ValueError(
            "train.branch_cooldowns: needs a cooldown; give train.options.cooldown > 0 (e.g. 0.2)"
        )
    if search.train.devices_per_trial > 1:
        raise ValueError("train.branch_cooldowns: not yet with train.devices_per_trial > 1; use 1")


SEARCH_CHECKPOINT_EVERY_S = 60.0
MIN_STEPS = 20
"""`hparams: deepseek` keeps its batch to at most 1/MIN_STEPS of a run's tokens."""

RULE_STEPS = 500
"""`hparams: small` gives every run at least this many optimizer steps (issue 16: at a few hundred steps
the loss is set by the steps and the lr as much as by N)."""
SMALL_LR_A = 3.83
SMALL_LR_B = 0.673
"""`hparams: small`: lr = SMALL_LR_A * N^-SMALL_LR_B, N the activated non-embedding parameters; fitted by
`python -m benchmarks.lr_sweep sweep` at the shipped study's smallest budget (docs/scaling-study.md)."""
SMALL_WARMUP_CAP = 0.1
"""`hparams: small`: the warmup (N tokens, Porian et al. 2024) is at most this share of the smallest run..."""
SMALL_WARMUP_STEPS = 10
"""... and at least this many of its steps (N tokens is a step or two for the smallest models)."""


def _deepseek_batch(budget_flops: float, seq_len: int) -> int:
    """DeepSeek LLM's B_opt = 0.2920 C^0.3271 tokens, in whole sequences (at least one)."""
    return max(1, round(0.2920 * budget_flops**0.3271 / seq_len))


def small_hparams(
    n_params: int, budget_flops: float, tokens: int, smallest: tuple[float, int], seq_len: int
) -> dict[str, Any]:
    """`hparams: small` for one model at one budget: lr, batch size (sequences) and warmup tokens.

    The batch is DeepSeek LLM's compute-optimal one at the budget, made smaller where the run would get
    fewer than RULE_STEPS steps (down to one sequence). The lr and the warmup depend on the model alone,
    so they are the same at every budget of a ladder.

    Args:
        n_params: activated non-embedding parameters N: lr = SMALL_LR_A N^-SMALL_LR_B, and the warmup is N
            tokens (Porian et al. 2024, arXiv 2406.19146: a short warmup for small models), kept between
            SMALL_WARMUP_STEPS steps and SMALL_WARMUP_CAP of the model's run at the smallest budget.
        budget_flops: this run's training FLOPs.
        tokens: this run's tokens.
        smallest: the search's smallest budget and the model's tokens there.
        seq_len: tokens per sequence.
    """

    def batch(c: float, t: int) -> int:
        return max(1, min(_deepseek_batch(c, seq_len), t // (seq_len * RULE_STEPS)))

    c0, t0 = smallest
    warmup = max(SMALL_WARMUP_STEPS * batch(c0, t0) * seq_len, n_params)
    warmup = max(1, min(warmup, int(SMALL_WARMUP_CAP * t0)))
    return {
        "lr": SMALL_LR_A * n_params**-SMALL_LR_B,
        "batch_size": batch(budget_flops, tokens),
        "warmup_tokens": warmup,
    }


def hparams(
    search: SearchSpec,
    budget_flops: float,
    seq_len: int,
    tokens: int | None = None,
    spec: ModelSpec | None = None,
) -> dict[str, Any]:
    """The learning rate and batch size (sequences) that `train.hparams` gives at one budget (and, for
    `small`, warmup_tokens; it needs `spec`); empty for `fixed` (the search's own train.lr /
    train.batch_size then apply)."""
    if search.train.hparams == "fixed":
        return {}
    if search.train.hparams == "small":
        from moeforge.compiler import account

        if spec is None:
            raise TypeError("hparams: small needs the candidate's spec")
        acc = account(spec)
        c0 = min(search.budget.budgets)
        fpt = acc.train_flops_per_token
        return small_hparams(
            acc.params_activated_non_embedding,
            budget_flops,
            int(budget_flops // fpt),
            (c0, int(c0 // fpt)),
            spec.seq_len,
        )
    lr = 0.3118 * budget_flops**-0.1250
    batch = _deepseek_batch(budget_flops, seq_len)
    if tokens is not None:
        batch = max(1, min(batch, tokens // (seq_len * MIN_STEPS)))
    return {"lr": lr, "batch_size": batch}


def train_config(
    search: SearchSpec, *, budget_flops: float, seed: int, device: str, rule: dict[str, Any] | None = None
) -> TrainConfig:
    """The trainer's config for one run of a trial: the search's own settings, then `train.options`.

    `load_search` has checked the options against TrainConfig itself, so this raises only for a spec
    that did not come through it.
    """
    from moeforge.runtime import TrainConfig

    return TrainConfig(
        **_train_config_data(search, budget_flops=budget_flops, seed=seed, device=device, rule=rule)
    )


def _train_config_data(
    search: SearchSpec, *, budget_flops: float, seed: int, device: str, rule: dict[str, Any] | None = None
) -> dict[str, Any]:
    s = search.train
    settings: dict[str, Any] = {
        k: v for k, v in (("batch_size", s.batch_size), ("lr", s.lr)) if v is not None
    }
    settings.update(rule or {})  # `hparams` at this budget (train.hparams)
    options: dict[str, Any] = dict(s.options)
    # A retried or resumed trial continues from its last checkpoint: keep that close (the trainer's own
    # default is 5 minutes; a tiny model's checkpoint takes milliseconds).
    options.setdefault("checkpoint_every_s", SEARCH_CHECKPOINT_EVERY_S)
    return {
        "budget_flops": budget_flops,
        "seed": seed,
        "device": device,
        "eval_points": s.eval_points,
        **settings,
        **options,
    }


def search_schema() -> dict:
    """The JSON Schema of search specs."""
    return SearchSpec.model_json_schema()


def schema_path() -> Path:
    return Path(__file__).resolve().parent.parent / "specs" / "schema" / "search.schema.json"


# ---------------------------------------------------------------------------------------------- loading
def _key_problem(path: tuple[str, ...]) -> str | None:
    """Why a dotted key is not a model spec key, or None when it is one."""
    import difflib

    from moeforge.compiler import ModelSpec, model_classes

    options: list[type[BaseModel]] = [ModelSpec]
    for i, part in enumerate(path):
        fields = {f for cls in options for f in cls.model_fields}
        if part not in fields:
            close = difflib.get_close_matches(part, sorted(fields), n=1)
            where = ".".join(path[:i]) or "the model spec"
            hint = f"; did you mean {close[0]!r}?" if close else f"; keys there: {', '.join(sorted(fields))}"
            return f"{part!r} is not a key of {where}{hint}"
        nxt = [
            m
            for cls in options
            if part in cls.model_fields
            for m in model_classes(cls.model_fields[part].annotation)
        ]
        if i < len(path) - 1 and not nxt:
            return f"{'.'.join(path[: i + 1])} is a value, it has no sub-keys"
        options = nxt
    return None


def _train_option_problems(search: SearchSpec, locs: Locs) -> list[Problem]:
    """Located problems of `train.options`: keys the search sets itself, keys that are not TrainConfig
    fields (with a did-you-mean), values of the wrong type, and TrainConfig's own checks."""
    from moeforge.compiler import Problem, SpecError, locate, validate
    from moeforge.runtime import TrainConfig

    s = search.train
    where = ("train", "options")
    owned = {k: "budget.train_flops" for k in ("budget_flops", "tokens", "steps")}
    owned.update(seed="seeds", device="train.device", eval_points="train.eval_points")
    owned.update({k: f"train.{k}" for k in ("batch_size", "lr") if getattr(s, k) is not None})
    problems = [
        Problem(locate(locs, (*where, k)), f"train.options.{k}", f"set by the search; use {owned[k]}")
        for k in s.options
        if k in owned
    ]
    if problems:
        return problems
    # TrainConfig itself, strictly like the spec's sections (unknown key with did-you-mean, wrong type, YAML
    # number hints), with the search's own settings in, so its checks across keys (micro_batch_size <=
    # batch_size) see what the trainer will.
    sub_locs = {k[len(where) :]: v for k, v in locs.items() if k[: len(where)] == where}
    sub_locs[()] = locate(locs, where)
    data = _train_config_data(
        search, budget_flops=search.budget.budgets[0], seed=search.seeds[0], device=s.device
    )
    try:
        validate(TrainConfig, data, sub_locs)
    except SpecError as e:
        for p in e.problems:
            if p.key.split(".")[0] in s.options:
                problems.append(Problem(p.loc, f"train.options.{p.key}", p.message))
            else:  # a key the search sets (or none): say which, at the options
                msg = f"{p.key}: {p.message}" if p.key else p.message
                problems.append(Problem(locate(locs, where), "train.options", msg))
    return problems


def load_search(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SearchSpec:
    """Read a search spec from a path or a shipped name (``quickstart``), with its base model spec.

    The returned spec's `base` is always the base model spec's data (a mapping, composition done), so
    `trial_to_spec` needs no files.

    Raises:
        SpecError: every located problem in the search spec and its base, at once.
    """
    from moeforge.compiler import Problem, SpecError, apply_overrides, locate, read_yaml, resolve, validate

    path = resolve(path_or_name, "searches")
    soft: list[Problem] = []
    data, locs = read_yaml(path, soft)
    if not isinstance(data, dict):
        loc = locs.get((), None) or locate(locs, ())
        raise SpecError(
            [Problem(loc, "", "a search spec must be a mapping of keys; see `moeforge schema --search`")]
        )
    if overrides:
        data = apply_overrides(data, locs, overrides)
    problems: list[Problem] = []
    spec: SearchSpec | None = None
    try:
        spec = validate(SearchSpec, data, locs, soft)
    except SpecError as e:
        problems += e.problems
    # The base model spec, validated with its own locations, even when the search's own keys have problems.
    base, base_data, base_problems = _base_spec(data.get("base"), path, locs)
    problems += base_problems
    if spec is not None:
        problems += _train_option_problems(spec, locs)
        for key in spec.space.params:
            why = _key_problem(tuple(key.split(".")))
            if why:
                problems.append(Problem(locs[("space", "params", key)], f"space.params.{key}", why))
        if base is not None:
            problems += _axis_problems(spec, base, locs)
        problems += _data_problems(spec, path, locs)
    if problems:
        problems = list(dict.fromkeys(problems))
        problems.sort(key=lambda p: (p.loc.file.startswith("<--set"), p.loc.file, p.loc.line, p.loc.col))
        raise SpecError(problems)
    assert spec is not None and base_data is not None and base is not None
    size = spec.space.size
    if size is not None and size.activated_params is not None:  # targets become factors of the base's count
        from moeforge.compiler import account

        n0 = account(base).params_activated_non_embedding
        factors = tuple(n / n0 for n in size.activated_params)
        space = spec.space.model_copy(update={"size": SizeAxis(factors=factors, tolerance=size.tolerance)})
        spec = spec.model_copy(update={"space": space})
    return spec.model_copy(update={"base": base_data})


def _base_spec(ref: Any, path: Path, locs: Locs) -> tuple[ModelSpec | None, dict | None, list[Problem]]:
    """The search's base model spec (validated, or None), its data (composition done), and its problems.

    A string names a model spec file (problems are located in it, under its own keys); a mapping is a spec
    written inline, possibly on top of a file (``base: {base: debug, ...}``; problems are ``base.*`` keys).
    Anything else is left to the search spec's own validation.
    """
    from moeforge.compiler import ModelSpec, Problem, SpecError, load_document, merge_specs, resolve, validate

    if isinstance(ref, str):
        try:
            base_path = resolve(ref, "models", relative_to=path.parent)
        except SpecError as e:
            return None, None, [Problem(locs[("base",)], "base", f"{ref!r}: {e.problems[0].message}")]
        try:
            soft: list[Problem] = []
            data, base_locs = load_document(base_path, "models", soft)
            return validate(ModelSpec, data, base_locs, soft), data, []
        except SpecError as e:  # located in the base file, under its own keys
            return None, None, e.problems
    if not isinstance(ref, dict):
        return None, None, []
    data = dict(ref)
    base_locs = {k[1:]: v for k, v in locs.items() if k[:1] == ("base",)}
    base_locs[()] = locs[("base",)]
    try:
        if isinstance(data.get("base"), str):  # an inline spec may build on a file: `base: {base: debug}`
            parent_ref = data.pop("base")
            try:
                parent = resolve(parent_ref, "models", relative_to=path.parent)
            except SpecError as e:
                where = locs[("base", "base")]
                return None, None, [Problem(where, "base.base", f"{parent_ref!r}: {e.problems[0].message}")]
            parent_data, parent_locs = load_document(parent, "models")
            data, base_locs = merge_specs(parent_data, parent_locs, data, base_locs)
        return validate(ModelSpec, data, base_locs), data, []
    except SpecError as e:
        return (
            None,
            None,
            [Problem(p.loc, f"base.{p.key}" if p.key else "base", p.message) for p in e.problems],
        )


def _token_files(data: str, here: Path) -> bool:
    """Whether `train.data` names token files (.bin, a folder of them, or a glob), whose bytes per token
    are unknown; decided from the path alone, so loading a spec reads no data."""
    import glob

    if glob.has_magic(data):
        return True
    path = Path(data).expanduser()
    path = path if path.is_absolute() or path.exists() else here / path
    if path.is_dir() and (path / "meta.json").is_file():
        return False  # prepared by `moeforge data prepare`: meta.json carries the measured bytes per token
    return path.suffix == ".bin" or (path.is_dir() and any(path.glob("*.bin")))


def _data_problems(spec: SearchSpec, path: Path, locs: Locs) -> list[Problem]:
    """What the objective needs from the data and the data cannot give."""
    from moeforge.compiler import Problem, locate

    data = spec.train.data
    if spec.objective.metric == "val_bits_per_byte" and data is not None and _token_files(data, path.parent):
        return [
            Problem(
                locate(locs, ("objective", "metric")),
                "objective.metric",
                f"val_bits_per_byte needs the bytes behind each token, unknown for the token files of "
                f"train.data {data!r}; use val_loss, or text data",
            )
        ]
    return []


def _axis_problems(spec: SearchSpec, base: ModelSpec, locs: Locs) -> list[Problem]:
    """The space's axes against the base model spec."""
    from moeforge.compiler import Problem

    problems = []
    if spec.space.width_depth is not None and base.attention.kind == "mla":
        problems.append(
            Problem(
                locs[("space", "width_depth")],
                "space.width_depth",
                "cannot trade width for depth with mla attention: its latent ranks (q_lora_rank, "
                "kv_lora_rank) and head dims (qk_nope_head_dim, qk_rope_head_dim, v_head_dim) are separate "
                "widths with no one rule to scale by d_model; use an mha or gqa base, or search n_layers, "
                "d_model and the MLA dims in space.params under constraints.max_forward_flops_per_token",
            )
        )
    if spec.space.size is not None and base.attention.kind == "mla":
        problems.append(
            Problem(
                locs[("space", "size")],
                "space.size",
                "cannot scale an mla model: its latent ranks and head dims are separate widths with no one "
                "rule to scale by d_model; use an mha or gqa base",
            )
        )
    if spec.space.size is not None and base.moe is not None and base.moe.layers is not None:
        problems.append(
            Problem(
                locs[("space", "size")],
                "space.size",
                "cannot change the depth of a spec that lists its MoE layers (moe.layers); use "
                "moe.first_dense / moe.every instead",
            )
        )
    for axis in ("granularity", "shared"):
        if getattr(spec.space, axis) and (base.moe is None or base.moe.paper is None):
            problems.append(
                Problem(
                    locs[("space", axis)],
                    f"space.{axis}",
                    "needs the base spec's MoE in paper form (moe.paper: {experts: N, top_k: K, m: m, shared: K_s})",
                )
            )
    return problems
