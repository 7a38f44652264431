"""Training one spec at one seed: the trainer call that the in-process evaluator and every process of
a torchrun group share, the hyper-parameter rule at a budget, and the job file a group reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeforge.compiler import ModelSpec, account

from ._spec import SearchSpec, hparams

if TYPE_CHECKING:
    from moeforge.runtime import Corpus, RunSummary, Tracking, TrainConfig
    from torch import nn


def rule_for(search: SearchSpec, spec: ModelSpec, budget: float) -> dict[str, Any]:
    """`train.hparams` at this spec and budget (empty for fixed)."""
    tokens = int(budget // account(spec).train_flops_per_token)
    return hparams(search, budget, spec.seq_len, tokens, spec)


def train_spec(
    model: nn.Module,
    spec: ModelSpec,
    corpus: Corpus,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool,
    on_eval: Callable[[float, dict], None] | None = None,
    extra_summary: dict[str, Any] | None = None,
    tracking: Tracking | None = None,
) -> RunSummary:
    """Train a built `model` of `spec` with `moeforge.runtime.train`; returns the trainer's summary.
    `tracking` sends its curves to TensorBoard / W&B / MLflow as well."""
    from moeforge.runtime import train  # imports torch: only where a model trains

    return train(
        model,
        seq_len=spec.seq_len,
        train_flops_per_token=account(spec).train_flops_per_token,
        corpus=dataclasses.replace(corpus, vocab_size=spec.vocab_size),
        cfg=cfg,
        out_dir=out_dir,
        resume=resume,
        on_eval=on_eval,
        progress=False,
        extra_summary={"spec_name": spec.name, **(extra_summary or {})},
        tracking=tracking,
    )


def job(
    search: SearchSpec,
    spec: ModelSpec,
    seed: int,
    budget: float,
    device: str,
    out_dir: Path,
    resume: bool,
    rule: dict,
) -> dict:
    """A torchrun group's job file content: everything a process needs, as JSON."""
    return {
        "search": search.model_dump(mode="json"),
        "spec": spec.model_dump(mode="json"),
        "seed": seed,
        "budget": budget,
        "device": device,
        "out_dir": str(out_dir),
        "resume": resume,
        "rule": rule,
    }
