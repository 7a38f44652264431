"""One WSD run, many budgets: a stable phase trained once, a cooldown branched off it for each budget.

Hägele et al. 2024 (arXiv 2405.18392, code: epfml/schedules-and-scaling): a warmup-stable-decay schedule with
a short cooldown (about 20% of the run, 1-sqrt shape) matches cosine at each length, and since the learning
rate before the cooldown is the same for every length, one stable run checkpointed where each budget's
cooldown starts gives the losses of a whole ladder of budgets.

Why it is exact here. With `warmup_tokens` (an absolute warmup) a WSD run's learning rate after each step
depends on the run's total only inside the cooldown (`lr_at`); the data order is one generator drawing a
full batch per step; evaluation changes no state. So a run to total T and the stable run take the same
steps up to T's branch point: the last step boundary whose learning rate is still the stable one
(`branch_points`). The stable run saves a checkpoint there (the trainer's usual safetensors folder), and
`train_cooldown` resumes it with T as the budget, which trains only the cooldown: the result is the
straight run's, to the bit on CPU.

Layout. `train_stable(..., out_dir=S)` makes S an ordinary run dir (metrics.jsonl, summary.json, checkpoint/
at the last branch point) plus `S/branches/<tokens>/`, one checkpoint folder per branch point.
`train_cooldown(..., branch=S/branches/<tokens>, out_dir=R)` copies the branch into R/checkpoint and
resumes: R is an ordinary run dir of the budget, itself resumable if interrupted.

Compute: a ladder of totals T_1 < ... < T_n trains max(b_i) + sum(T_i - b_i) tokens instead of sum(T_i),
b_i the branch points (`ladder_tokens`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ._checkpoint import STATE_FILE, find_checkpoint
from ._config import TrainConfig
from ._data import Corpus
from ._schedule import in_cooldown, planned_tokens
from ._summary import RunSummary
from ._tracking import Tracking
from ._train import CHECKPOINT_DIR, Trainer

BRANCHES_DIR = "branches"
# what the stable phase's steps depend on: a branch checkpoint serves a budget only when these agree
_STABLE_KEYS = (
    "lr",
    "warmup_tokens",
    "schedule",
    "batch_size",
    "beta2",
    "weight_decay",
    "grad_clip",
    "seed",
)


@dataclass(frozen=True)
class StableRun:
    """What `train_stable` made: the stable run's summary and, per budget (total tokens), its branch."""

    summary: RunSummary | None
    """The stable run's summary (None when an earlier call's run stopped before writing one)."""
    branches: dict[int, Path]
    """Total tokens of a budget -> the checkpoint folder its cooldown starts from."""


def branch_point(cfg: TrainConfig, total: int, seq_len: int) -> int:
    """Tokens at the end of the last step of a WSD run of `total` tokens whose learning rate is the stable one.

    Raises:
        ValueError: `cfg` is not WSD with `warmup_tokens`, or the cooldown would start before the warmup ends.
    """
    _check_wsd(cfg)
    step = cfg.batch_size * seq_len
    k = max(total - 1, 0) // step  # whole steps that end before the total (the last step may be short)
    while k > 0 and in_cooldown(cfg, k * step / total):  # the trainer's very test
        k -= 1
    b = k * step
    assert cfg.warmup_tokens is not None
    if b < cfg.warmup_tokens:
        raise ValueError(
            f"warmup_tokens: {cfg.warmup_tokens:,} is more than the {b:,} tokens before the cooldown of a "
            f"{total:,}-token run; use a shorter warmup or a larger budget"
        )
    return b


def _check_wsd(cfg: TrainConfig) -> None:
    if cfg.schedule != "wsd":
        raise ValueError(f"schedule: {cfg.schedule!r}; branched cooldowns need schedule wsd")
    if cfg.warmup_tokens is None:
        raise ValueError(
            "warmup_tokens: not set; branched cooldowns need an absolute warmup (a fraction of the run would make "
            "the stable phase differ between budgets)"
        )
    if cfg.cooldown <= 0:
        raise ValueError("cooldown: 0; give each budget's cooldown fraction (e.g. 0.2)")


def _same_stable(where: Path, was: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise ValueError when a stable run saved with config `was` is not the stable phase of config `now`."""
    differ = [k for k in _STABLE_KEYS if was.get(k) != now[k]]
    if differ:
        raise ValueError(
            f"{where}: the stable run trained with "
            + ", ".join(f"{k} {was.get(k)!r}" for k in differ)
            + f", this budget asks for {', '.join(f'{k} {now[k]!r}' for k in differ)}"
        )


def ladder_tokens(cfg: TrainConfig, totals: Sequence[int], seq_len: int) -> tuple[int, int]:
    """Tokens a ladder of budgets trains (branched, separate): max(b_i) + sum(T_i - b_i) against sum(T_i)."""
    points = [branch_point(cfg, t, seq_len) for t in totals]
    return max(points) + sum(t - b for t, b in zip(totals, points, strict=True)), sum(totals)


def train_stable(
    model: nn.Module,
    *,
    seq_len: int,
    train_flops_per_token: int,
    corpus: Corpus,
    cfg: TrainConfig,
    totals: Sequence[int],
    out_dir: Path,
    progress: bool = False,
    extra_summary: dict | None = None,
) -> StableRun:
    """Train the warmup and stable phase of the WSD run `cfg` (its budget is ignored) once, to the branch point
    of the largest of `totals` (token counts), checkpointing at each total's branch point.

    A stable run already in `out_dir` (same stable settings) is extended from its checkpoint: the stable
    phase does not depend on the total, so a later call with a larger total trains only the tokens in
    between, and a call whose branches all exist trains nothing.

    Raises:
        ValueError: `cfg` is not WSD with `warmup_tokens`, or a total's cooldown would start in the warmup.
        RuntimeError: the run stopped (e.g. at `time_s`) before a branch point.
        Exception: whatever `train` raises.
    """
    if not totals:
        raise ValueError("totals: give at least one budget's token count")
    points = {t: branch_point(cfg, t, seq_len) for t in totals}
    last = max(points.values())
    stable = cfg.model_copy(update={"cooldown": 0.0, "tokens": last, "budget_flops": None, "steps": None})
    out_dir = Path(out_dir)
    branches = {t: out_dir / BRANCHES_DIR / str(b) for t, b in points.items()}
    found = find_checkpoint(out_dir / CHECKPOINT_DIR)
    if found is not None:  # an earlier call (or an interrupted one): extend it, the stable phase is the same
        import json

        saved = json.loads((found / STATE_FILE).read_text())
        _same_stable(out_dir, saved.get("config", {}), cfg.to_dict())
        if all(find_checkpoint(p) is not None for p in branches.values()):
            summary_path = out_dir / "summary.json"
            summary = RunSummary.read(summary_path) if summary_path.is_file() else None
            return StableRun(summary, branches)  # every branch is there: nothing to train
    else:  # stopped before its first checkpoint: starts over
        for name in ("summary.json", "metrics.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
    trainer = Trainer(
        model,
        seq_len=seq_len,
        train_flops_per_token=train_flops_per_token,
        corpus=corpus,
        cfg=TrainConfig.model_validate(stable.model_dump()),
        out_dir=out_dir,
        resume=found is not None,
        progress=progress,
        extra_summary=extra_summary,
    )
    trainer.branch_at = {b: out_dir / BRANCHES_DIR / str(b) for b in points.values()}
    summary = trainer.run()
    missing = sorted(t for t, p in branches.items() if find_checkpoint(p) is None)
    if missing:
        raise RuntimeError(
            f"{out_dir}: the stable run stopped ({summary.stopped_by}) at {summary.tokens:,} tokens, "
            f"before the branch points of totals {missing}"
        )
    return StableRun(summary, branches)


def train_cooldown(
    model: nn.Module,
    *,
    seq_len: int,
    train_flops_per_token: int,
    corpus: Corpus,
    cfg: TrainConfig,
    branch: Path,
    out_dir: Path,
    on_eval: Callable[[float, dict], None] | None = None,
    progress: bool = False,
    extra_summary: dict | None = None,
    tracking: Tracking | None = None,
) -> RunSummary:
    """Finish one budget (`cfg`'s) from its branch checkpoint of `train_stable`: only the cooldown is trained.

    `out_dir` becomes the budget's own run dir; if it already holds this cooldown's checkpoint (an interrupted
    call), the cooldown resumes from there. The model is built by the caller (its weights are replaced).

    Raises:
        ValueError: `branch` is not this budget's branch point, or was trained with other settings.
        FileExistsError: `out_dir` holds a finished run.
        Exception: whatever `train` raises.
    """
    import json

    total = planned_tokens(cfg, seq_len, train_flops_per_token)
    if total is None:
        raise ValueError("train_cooldown needs a budget in tokens, FLOPs or steps (not time_s alone)")
    b = branch_point(cfg, total, seq_len)
    branch, out_dir = Path(branch), Path(out_dir)
    found = find_checkpoint(branch)
    if found is None:
        raise FileNotFoundError(f"{branch}: no checkpoint")
    saved = json.loads((found / STATE_FILE).read_text())
    if saved.get("tokens") != b:
        raise ValueError(
            f"{branch}: a checkpoint at {saved.get('tokens'):,} tokens; a {total:,}-token budget's cooldown "
            f"starts at {b:,}"
        )
    _same_stable(branch, saved.get("config", {}), cfg.to_dict())
    if (out_dir / "summary.json").exists() and find_checkpoint(out_dir / CHECKPOINT_DIR) is None:
        raise FileExistsError(f"{out_dir} already holds a run; choose another output folder")
    if find_checkpoint(out_dir / CHECKPOINT_DIR) is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{CHECKPOINT_DIR}.branch"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(found, tmp)
        tmp.rename(out_dir / CHECKPOINT_DIR)
    return Trainer(
        model,
        seq_len=seq_len,
        train_flops_per_token=train_flops_per_token,
        corpus=corpus,
        cfg=cfg,
        out_dir=out_dir,
        resume=True,
        on_eval=on_eval,
        progress=progress,
        extra_summary={"branch": str(branch), **(extra_summary or {})},
        tracking=tracking,
    ).run()
