"""A trial record: one trial of a study as trials.json writes it (what the report, the leaderboards and the
scaling fit read)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._trials import counted

RECORD_KEYS = (
    "number",
    "state",
    "value",
    "values",
    "params",
    "m",
    "routed_experts",
    "shared_experts",
    "top_k",
    "expert_hidden",
    "d_model",
    "n_layers",
    "params_total",
    "params_activated",
    "params_non_embedding",
    "params_activated_non_embedding",
    "size",
    "forward_flops_per_token",
    "train_flops",
    "budget_flops",
    "tokens",
    "initial_val_loss",
    "val_bits_per_byte",
    "tokens_per_second",
    "load",
    "seeds",
    "seed_values",
    "value_mean",
    "value_std",
    "counted",
    "infeasible",
    "reused_from",
    "retry_of",
    "fail_reason",
    "fail_kind",
    "traceback",
    "retried",
    "died",
    "skipped",
    "hparams",
    "spec_key",
    "trial_dir",
    "data_fingerprint",
    "environment",
    "branch_point",
    "constraints",
    "worker",
    "duration_s",
)


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as trials.json writes it (missing numbers are null)."""
    ua = t.user_attrs
    rec: dict[str, Any] = {k: ua.get(k) for k in RECORD_KEYS}
    rec.update(
        number=t.number,
        state=t.state.name,
        value=t.values[0] if t.values else None,
        values=list(t.values) if t.values else None,
        params=dict(t.params),
        counted=bool(counted([t])),  # the same rule as the n_trials cap
        size=t.params.get("size"),
        duration_s=t.duration.total_seconds() if t.duration else None,
    )
    retry = t.system_attrs.get("failed_trial")
    if retry is not None and rec["retry_of"] is None:
        rec["retry_of"] = retry
    if t.state == TrialState.FAIL and rec["fail_reason"] is None and not rec["skipped"] and not rec["died"]:
        rec["died"] = "worker died"  # failed by a heartbeat or pid check, not by its own training
    return rec


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of `study` as a record, in trial order."""
    return [trial_record(t) for t in study.get_trials(deepcopy=False)]
