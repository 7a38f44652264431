"""Branched cooldowns on a budget ladder (`train.branch_cooldowns`): one stable run per architecture and seed,
each budget's cooldown branched off it.

A WSD run with `warmup_tokens` takes the same steps at every total until its cooldown starts
(`moeforge.runtime.branch_point`), so the budgets of a ladder share one warmup + stable phase. Each budget
stays its own trial and folder (`trials/<spec key>-C<budget>/seed-<seed>`, summary.json, resumable); what
they share is a stable run in `trials/<spec key>-stable-<settings>/seed-<seed>`, `<settings>` a digest of
every training setting the stable phase depends on (budgets whose settings differ, e.g. under an hparams
rule that changes the lr with the budget, get stable runs of their own, so a branch is always exact).

A budget's trial, under the stable run's lock, extends the stable run to its own branch point if it is not
there yet (saving the branch checkpoints of the ladder's smaller budgets on the way), then trains only its
cooldown into its own folder. Trials of one architecture at several budgets may run in several workers at
once: the stable run is trained by one process at a time (`fcntl.flock`, which the kernel releases when its
holder dies, so a crashed worker leaves no stale lock), and a crash anywhere resumes from the last
checkpoint (the stable run's, or the budget's own cooldown's) without losing finished work.

Compute: an architecture's finished budgets T_i with branch points b_i trained max(b_i) + sum(T_i - b_i)
tokens per seed instead of sum(T_i) (`ladder_compute`, printed by `search` and `search report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeforge.compiler import ModelSpec, account

from ._space import spec_key
from ._spec import SearchSpec, train_config
from ._training import rule_for

if TYPE_CHECKING:
    from moeforge.runtime import Corpus, Tracking, TrainConfig

    from ._records import TrialRecord

STABLE = "-stable-"
BRANCH_ATTR = "branch_point"
"""The summary key (and trial attr) of a branched budget: {"stable": stable folder name, "tokens": b}."""
# settings that differ between the budgets of one stable phase, or do not change its steps
_NOT_STABLE = (
    "budget_flops",
    "tokens",
    "steps",
    "time_s",
    "seed",
    "eval_points",
    "checkpoint_every_s",
    "device",
)


def stable_settings(cfg: TrainConfig) -> str:
    """A digest of what the stable phase of `cfg` depends on: equal for the budgets that can share it."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_STABLE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def stable_dir(trials_root: Path, spec: ModelSpec, cfg: TrainConfig) -> Path:
    """The stable run of `spec` under `cfg`'s settings, at `cfg`'s seed."""
    return trials_root / f"{spec_key(spec)}{STABLE}{stable_settings(cfg)}" / f"seed-{cfg.seed}"


@contextlib.contextmanager
def stable_lock(run: Path) -> Iterator[None]:
    """Hold the stable run `run` for this process (blocks while another process holds it).

    An advisory `flock` on `<run>.lock`: the kernel drops it when the holder exits or dies, so no stale
    lock outlives a crashed worker. The holder's host and pid are written in the file, for a person."""
    path = run.with_name(run.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _budget_config(search: SearchSpec, spec: ModelSpec, budget: float, seed: int, device: str) -> TrainConfig:
    return train_config(
        search, budget_flops=budget, seed=seed, device=device, rule=rule_for(search, spec, budget)
    )


def _point(cfg: TrainConfig, seq_len: int, fpt: int) -> tuple[int, int] | None:
    """(total tokens, branch point) of one budget, or None when its cooldown cannot branch (it would start
    inside the warmup)."""
    from moeforge.runtime import branch_point, planned_tokens

    total = planned_tokens(cfg, seq_len, fpt)
    assert total is not None  # a search budget is in FLOPs
    try:
        return total, branch_point(cfg, total, seq_len)
    except ValueError:
        return None


def evaluate_branched(
    search: SearchSpec,
    corpus: Corpus,
    spec: ModelSpec,
    seed: int,
    budget: float,
    out_dir: Path,
    on_eval: Callable[[float, dict], None],
    device: str,
    tracking: Tracking | None = None,
) -> dict[str, Any] | None:
    """Train one budget of a branched ladder into `out_dir` (which holds no checkpoint yet): extend the
    shared stable run to this budget's branch point if needed, then train the cooldown alone. Returns the
    trainer's summary, or None when this budget cannot branch (its cooldown would start inside the warmup,
    or the stable run went past its branch point without saving it): the caller then trains it whole.
    """
    from moeforge.compiler import build
    from moeforge.runtime import find_checkpoint, train_cooldown, train_stable

    fpt = account(spec).train_flops_per_token
    cfg = _budget_config(search, spec, budget, seed, device)
    own = _point(cfg, spec.seq_len, fpt)
    if own is None:
        return None
    b = own[1]
    settings = stable_settings(cfg)
    totals = [own[0]]  # with the ladder's budgets that share this stable run and branch at or before it
    for c in search.budget.budgets:
        other = _budget_config(search, spec, c, seed, device)
        point = _point(other, spec.seq_len, fpt)
        if point is not None and point[1] <= b and point[0] != own[0] and stable_settings(other) == settings:
            totals.append(point[0])
    corpus = dataclasses.replace(corpus, vocab_size=spec.vocab_size)
    kw: dict[str, Any] = {"seq_len": spec.seq_len, "train_flops_per_token": fpt, "corpus": corpus}
    run = stable_dir(out_dir.parent.parent, spec, cfg)  # beside the trial folders (`trial_dir`)
    branch = run / "branches" / str(b)
    with stable_lock(run):
        if find_checkpoint(branch) is None:
            model = build(spec, device=device, seed=seed)
            try:
                train_stable(
                    model,
                    **kw,
                    cfg=cfg.model_copy(update={"eval_points": 0}),  # evaluated where each budget ends
                    totals=totals,
                    out_dir=run,
                    extra_summary={"spec_name": spec.name},
                )
            except (ValueError, RuntimeError):
                pass  # went past a smaller budget's point without saving it (pruned): judged just below
            finally:
                del model
        if find_checkpoint(branch) is None:  # the stable run is past this point without its branch
            return None
    model = build(spec, device=device, seed=seed)  # its weights come from the branch
    return train_cooldown(
        model,
        **kw,
        cfg=cfg,
        branch=branch,
        out_dir=out_dir,
        on_eval=on_eval,
        extra_summary={"spec_name": spec.name, BRANCH_ATTR: {"stable": run.parent.name, "tokens": b}},
        tracking=tracking,
    )


def stable_runs_needed(trials: list[Any], budgets: tuple[float, ...]) -> set[str]:
    """Spec keys (without the budget) whose stable runs a budget still needs: one of its budgets has no
    finished final trial yet, or runs, waits or is retried. `trials` are Optuna FrozenTrials."""
    from optuna.trial import TrialState

    from ._trials import FINISHED, superseded

    done: dict[str, set[float]] = {}
    busy: set[str] = set()
    for t in trials:
        key = t.user_attrs.get("spec_key")
        if not key or "-C" not in key:
            continue
        base = key.rsplit("-C", 1)[0]
        done.setdefault(base, set())
        if t.state in (TrialState.RUNNING, TrialState.WAITING) or t.user_attrs.get("retried"):
            busy.add(base)
        elif t.state in FINISHED and not superseded(t) and "budget" in t.params:
            done[base].add(float(t.params["budget"]))
    return busy | {k for k, got in done.items() if not set(budgets) <= got}


def ladder_compute(records: list[TrialRecord]) -> tuple[int, int] | None:
    """(tokens trained, tokens separate runs would have trained) over the finished trials of a branched
    ladder, all seeds; None when no trial branched.

    Per stable run: max(b_i) + sum(T_i - b_i) against sum(T_i), T_i a budget's tokens, b_i its branch point.
    A budget trained whole counts T_i on both sides."""
    groups: dict[str, list[tuple[int, int]]] = {}
    whole = seeds_of = 0
    branched_any = False
    for r in records:
        if r.state != "COMPLETE" or r.reused_from is not None or r.tokens is None:
            continue
        n = len(r.seeds or [0])
        point = r.branch_point
        if not point:
            whole += int(r.tokens) * n
            continue
        branched_any = True
        groups.setdefault(f"{point['stable']}/{n}", []).append((int(r.tokens), int(point["tokens"])))
    if not branched_any:
        return None
    trained = separate = whole
    for name, runs in groups.items():
        seeds_of = int(name.rsplit("/", 1)[1])
        trained += seeds_of * (max(b for _, b in runs) + sum(t - b for t, b in runs))
        separate += seeds_of * sum(t for t, _ in runs)
    return trained, separate


def ladder_compute_line(records: list[TrialRecord]) -> str | None:
    """``branched cooldowns: 1,234 tokens trained, 2,345 for separate runs (47% saved)``, or None."""
    got = ladder_compute(records)
    if got is None:
        return None
    trained, separate = got
    saved = 1 - trained / separate if separate else 0.0
    return (
        f"branched cooldowns: {trained:,} tokens trained where separate runs would train {separate:,} "
        f"({saved:.0%} saved)"
    )
