"""The training config: one typed object, validated where it is made.

It lives apart from the trainer so that reading it needs no torch: the search checks a spec's
``train.options`` against it when the spec loads (`moeforge validate` stays torch-free).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the budget (exactly one of budget_flops, tokens, steps; time_s caps any or stands alone),
    the batch, the optimizer and schedule, and where to run."""

    budget_flops: float | None = None
    """Training FLOPs; tokens = budget / train_flops_per_token."""
    tokens: int | None = None
    steps: int | None = None
    time_s: float | None = None
    """Wall-clock limit in seconds (evaluations and checkpoints included, over all resumed segments)."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    micro_batch_size: int | None = None
    """Gradient accumulation when smaller than batch_size."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05
    """Fraction of the run spent in linear warmup."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent in the final linear decay."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping (the norm is still logged)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    compile: bool = False
    seed: int = 0
    """Seeds the data order (and the torch RNG); the model's initialization is the caller's."""
    eval_tokens: int = 32768
    """Held-out tokens per evaluation (fixed windows of the corpus's validation split)."""
    eval_points: int = 4
    """on_eval is called at fractions 1/n, 2/n, ..., 1 of the run (n = max(eval_points, 1)); the last is the
    final evaluation. An evaluation before training gives initial_val_loss."""
    checkpoint_every_s: float = 300.0
    log_every: int = 10
    """Steps between train lines in metrics.jsonl (and checks of the wall-clock limit)."""

    def __post_init__(self) -> None:
        given = [k for k in ("budget_flops", "tokens", "steps") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of budget_flops, tokens, steps; got {', '.join(given)}")
        if not given and self.time_s is None:
            raise ValueError("give a budget: budget_flops, tokens, steps or time_s")
        for k in ("budget_flops", "tokens", "steps", "time_s", "lr", "batch_size", "micro_batch_size"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ValueError(f"{k}: {v} must be > 0")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size: {self.micro_batch_size} is larger than batch_size {self.batch_size}"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup: {self.warmup} must be a fraction in [0, 1)")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction: {self.decay_fraction} must be in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule: {self.schedule!r} is not cosine or wsd")
        if self.eval_tokens < 1 or self.eval_points < 0 or self.log_every < 1 or self.grad_clip < 0:
            raise ValueError("eval_tokens and log_every must be >= 1, eval_points and grad_clip >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
