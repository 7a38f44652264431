"""The training config: one typed object, validated where it is made.

It lives apart from the trainer so that reading it needs no torch: the search checks a spec's
``train.options`` against it when the spec loads (`moeforge validate` stays torch-free).

A frozen pydantic model with extra keys forbidden, like the spec sections: single-field ranges are field
constraints, the checks that read several fields are one model validator, and its messages name the key
("micro_batch_size: 8 is larger than batch_size 4"), which the spec loader turns into a located error.
Built in Python (``TrainConfig(steps=3)``) it converts like pydantic's lax mode (``tokens=1e6`` is an
int); the search validates ``train.options`` strictly, as it does the rest of a spec.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class TrainConfig(BaseModel):
    """How to train: the budget (exactly one of budget_flops, tokens, steps; time_s caps any or stands alone),
    the batch, the optimizer and schedule, and where to run."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    budget_flops: float | None = Field(None, gt=0)
    """Training FLOPs; tokens = budget / train_flops_per_token."""
    tokens: int | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    time_s: float | None = Field(None, gt=0)
    """Wall-clock limit in seconds (evaluations and checkpoints included, over all resumed segments)."""
    batch_size: int = Field(16, gt=0)
    """Sequences per optimizer step, over all processes: micro_batch_size x accumulation x world size."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Sequences per forward on one process: gradient accumulation when smaller than its share of the batch."""
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: float = 0.05
    """Fraction of the run spent in linear warmup."""
    warmup_tokens: int | None = Field(None, gt=0)
    """Linear warmup over this many tokens instead of the `warmup` fraction of the run. A WSD run needs it
    for its stable phase not to depend on the run's length, so that one stable run serves cooldowns branched
    at several budgets."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """cosine: warmup, then cosine down to lr * min_lr_ratio. wsd (warmup-stable-decay, Hägele et al. 2024,
    arXiv 2405.18392): warmup, constant lr, then a cooldown over the last `cooldown` of the run."""
    cooldown: float = Field(0.2, ge=0, le=1)
    """WSD: fraction of the run spent in the final decay to lr * min_lr_ratio; 0 keeps the lr constant
    to the end (a stable phase to branch cooldowns from)."""
    cooldown_shape: Literal["1-sqrt", "linear"] = "1-sqrt"
    """WSD: the decay's shape over the cooldown's fraction q: 1-sqrt (lr scaled by 1 - sqrt(q), the
    paper's best) or linear (1 - q; what older run dirs recorded as `decay_fraction` mean)."""
    beta2: float = Field(0.95, gt=0, lt=1)
    """AdamW's second-moment decay (beta1 is 0.9). Porian et al. 2024 (arXiv 2406.19146) find 0.99-0.999
    better at small batch."""
    weight_decay: float = 0.1
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 disables clipping (the norm is still logged)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (under torchrun, cuda means each process's own cuda:LOCAL_RANK)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (torchrun): ddp replicates the model, fsdp shards it (FSDP2). One process
    ignores it."""
    compile: bool = False
    seed: int = 0
    """Seeds the data order (and the torch RNG); the model's initialization is the caller's."""
    eval_tokens: int = Field(32768, ge=1)
    """Held-out tokens per evaluation (fixed windows of the corpus's validation split)."""
    eval_points: int = Field(4, ge=0)
    """on_eval is called at fractions 1/n, 2/n, ..., 1 of the run (n = max(eval_points, 1)); the last is the
    final evaluation. An evaluation before training gives initial_val_loss."""
    checkpoint_every_s: float = 300.0
    log_every: int = Field(10, ge=1)
    """Steps between train lines in metrics.jsonl (and checks of the wall-clock limit)."""

    @field_validator("warmup")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"{v} must be a fraction in [0, 1)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _legacy_decay_fraction(cls, data: Any) -> Any:
        # run dirs written before `cooldown` recorded a linear WSD decay as `decay_fraction`
        if isinstance(data, dict) and "decay_fraction" in data:
            data = dict(data)
            fraction = data.pop("decay_fraction")
            if "cooldown" in data:
                raise ValueError("decay_fraction: the old name of cooldown; give cooldown only")
            data["cooldown"] = fraction
            data.setdefault("cooldown_shape", "linear")
        return data

    @model_validator(mode="after")
    def _budget_and_batch(self) -> TrainConfig:
        given = [k for k in ("budget_flops", "tokens", "steps") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of budget_flops, tokens, steps; got {', '.join(given)}")
        if not given and self.time_s is None:
            raise ValueError("give a budget: budget_flops, tokens, steps or time_s")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size: {self.micro_batch_size} is larger than batch_size {self.batch_size}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from a dict (e.g. a run dir's train_config.json), every key checked.

        A key this version does not know is an error that names it (a stale key in a run dir is never
        silently dropped).

        Raises:
            ValueError: one line per problem, ``key: what is wrong``.
        """
        unknown = sorted(set(d) - set(cls.model_fields) - {"decay_fraction"})
        if unknown:
            raise ValueError(
                "\n".join(
                    f"{k}: unknown training option (known: {', '.join(cls.model_fields)})" for k in unknown
                )
            )
        try:
            return cls(**d)
        except ValidationError as e:
            raise ValueError(explain(e)) from None


def explain(e: ValidationError) -> str:
    """A ValidationError of TrainConfig as lines of ``key: message`` (what the CLI prints)."""
    lines = []
    for err in e.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] != "value_error":
            msg += f" (got {err['input']!r})"
        lines.append(f"{key}: {msg}" if key else msg)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the budget floor
MIN_STEPS = 20
"""The fewest optimizer steps of a full batch a token or FLOP budget must buy. The schedule warms up
linearly over the first `warmup` of the run (5%) and sets the rate after each step from the fraction then
done, so below 1/warmup steps (20) no step is a warmup step: the first one already runs at the peak rate.
20 full steps give the warmup one step and the decay 19, the least that is still a training run."""
MIN_STEPS_ENV = "MOEFORGE_MIN_STEPS"
"""Overrides MIN_STEPS (0 turns the floor off): for smoke tests that train a few steps on purpose."""


def min_steps(cfg: TrainConfig) -> int:
    """Full-batch optimizer steps a budget must buy: MIN_STEPS (or $MOEFORGE_MIN_STEPS), and at least
    1/warmup so the warmup gets a step of its own."""
    env = os.environ.get(MIN_STEPS_ENV, "").strip()
    if env:
        try:
            base = int(env)
        except ValueError:
            raise ValueError(f"${MIN_STEPS_ENV}: {env!r} is not a whole number of steps") from None
        if base <= 0:
            return 0
    else:
        base = MIN_STEPS
    return max(base, math.ceil(round(1 / cfg.warmup, 9))) if cfg.warmup > 0 else base


def budget_floor(cfg: TrainConfig, seq_len: int, train_flops_per_token: int) -> tuple[int, float]:
    """The smallest budget that trains `min_steps(cfg)` full batches: (tokens, training FLOPs)."""
    tokens = min_steps(cfg) * cfg.batch_size * seq_len
    return tokens, float(tokens * train_flops_per_token)


def round_up(x: float, digits: int = 3) -> float:
    """`x` rounded up to `digits` significant digits (a floor printed rounded down would not work)."""
    if x <= 0:
        return x
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / scale - 1e-9) * scale


def budget_problem(cfg: TrainConfig, seq_len: int, train_flops_per_token: int) -> str | None:
    """Why `cfg`'s token or FLOP budget is too small to train (see MIN_STEPS), naming the smallest budget
    that works, in the unit it was given; None when it is large enough, or given in steps or time only.

    The words fit after ``--budget-flops`` or ``budget_flops`` (or tokens): "2.5e+06 trains ...".
    """
    if cfg.budget_flops is not None:
        planned, given = int(cfg.budget_flops // train_flops_per_token), f"{cfg.budget_flops:g}"
    elif cfg.tokens is not None:
        planned, given = int(cfg.tokens), f"{cfg.tokens:,}"
    else:
        return None
    n = min_steps(cfg)
    need_tokens, need_flops = budget_floor(cfg, seq_len, train_flops_per_token)
    if planned >= need_tokens:
        return None
    need = f"{round_up(need_flops):.3g}" if cfg.budget_flops is not None else f"{need_tokens:,}"
    return (
        f"{given} trains {planned:,} token{'s' * (planned != 1)}, fewer than the {n} optimizer steps of "
        f"{cfg.batch_size} x {seq_len} tokens ({need_tokens:,}) a run needs for its warmup and decay; "
        f"the smallest budget that trains them is {need}"
    )
