"""A trial record: one trial of a study as trials.json writes it (what the report, the leaderboards and the
scaling fit read).

`TrialRecord` is the one typed object for it, serialized in one place: `to_dict` gives trials.json's keys
in their order, `TrialRecord.from_dict` and `load_trial_records` read them back. A trials.json written
before a key existed still loads (that key is None); a key this version does not know is an error that
names it. Reading records imports no Optuna (`moeforge scaling` on a trials.json needs none).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """One trial of a search, as trials.json holds it. Numbers a trial does not have are None."""

    number: int
    """The trial's number in its study."""
    state: str
    """Optuna's state: ``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING`` or ``WAITING``."""
    value: float | None = None
    """The objective (the mean over seeds); None unless complete."""
    values: list[float] | None = None
    """Every objective (with ``objective.params_total``: the value, then params_total)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The sampled parameters, by name."""
    m: float | None = None
    """The granularity m of the trial's spec (None for a dense spec)."""
    routed_experts: int | None = None
    """Routed experts per MoE layer (mN - K_s)."""
    shared_experts: int | None = None
    """Shared experts per MoE layer (K_s)."""
    top_k: int | None = None
    """Routed experts per token (mK - K_s)."""
    expert_hidden: int | None = None
    """One expert's hidden width."""
    d_model: int | None = None
    """The model width."""
    n_layers: int | None = None
    """Transformer blocks."""
    params_total: int | None = None
    """Parameters, all of them."""
    params_activated: int | None = None
    """Parameters one token uses."""
    params_non_embedding: int | None = None
    """Parameters without the embedding and output tables."""
    params_activated_non_embedding: int | None = None
    """Parameters one token uses, without the embedding and output tables (the scaling fit's N)."""
    size: float | None = None
    """A ladder's size multiplier (the ``size`` parameter), if sampled."""
    forward_flops_per_token: int | None = None
    """Analytic forward FLOPs per token."""
    train_flops: int | None = None
    """Training FLOPs of the first seed's run."""
    budget_flops: float | None = None
    """The trial's FLOP budget per seed."""
    tokens: int | None = None
    """Training tokens of the first seed's run."""
    initial_val_loss: float | None = None
    """Validation loss before training (first seed)."""
    val_bits_per_byte: float | None = None
    """Final bits per byte (first seed); None where the corpus does not know its bytes per token."""
    tokens_per_second: float | None = None
    """Training throughput of the first seed's run."""
    load: dict[str, Any] | None = None
    """Routed-expert load over the first seed's run (`moeforge.runtime.RunSummary.load`)."""
    seeds: list[int] | None = None
    """The seeds trained."""
    seed_values: list[float] | None = None
    """The objective at each seed, in `seeds` order."""
    value_mean: float | None = None
    """Mean of `seed_values`."""
    value_std: float | None = None
    """Sample standard deviation of `seed_values` (two seeds or more)."""
    counted: bool | None = None
    """Whether the trial counts toward ``n_trials`` (the cap's rule)."""
    infeasible: str | None = None
    """Why the spec broke a constraint (the trial did not train)."""
    reused_from: int | None = None
    """The earlier trial of the same spec whose result this one repeats."""
    retry_of: int | None = None
    """The failed trial this one retries."""
    fail_reason: str | None = None
    """Why the trial failed, in one line."""
    fail_kind: str | None = None
    """The failure's exception type (``NoMetric`` for a run without a finite metric)."""
    traceback: str | None = None
    """The failure's traceback file, relative to the run dir."""
    retried: bool | None = None
    """True when the failed trial was queued again."""
    died: str | None = None
    """Why a trial stopped without failing itself (``interrupted``, ``worker died``)."""
    skipped: str | None = None
    """Why a proposal was not trained (``n_trials reached by other workers``)."""
    hparams: dict[str, Any] | None = None
    """The hyper-parameter rule and the learning rate and batch size it gave."""
    spec_key: str | None = None
    """The spec's hash: its folder under trials/ and the dedup key."""
    trial_dir: str | None = None
    """The trial's folder, relative to the run dir."""
    data_fingerprint: str | None = None
    """The corpus's fingerprint (equal exactly when the tokens are)."""
    environment: dict[str, Any] | None = None
    """Software and hardware the first seed trained on (`moeforge.runtime.environment`)."""
    branch_point: dict[str, Any] | None = None
    """A branched cooldown's stable run and the token count it branched at (`train.branch_cooldowns`)."""
    constraints: list[float] | None = None
    """Optuna's constraint values (<= 0 feasible)."""
    worker: int | None = None
    """The worker that ran the trial."""
    duration_s: float | None = None
    """Seconds from the trial's start to its end."""

    def to_dict(self) -> dict[str, Any]:
        """The trial as trials.json writes it: every key, in order (`branch_point` only on a branched ladder,
        so other searches write what they always did)."""
        return {
            k: getattr(self, k) for k in RECORD_KEYS if k != "branch_point" or self.branch_point is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRecord:
        """A record from trials.json's content; a key missing in an older file is None.

        Raises:
            ValueError: a key this version does not know, or no number or state (each named).
        """
        unknown = sorted(set(d) - set(RECORD_KEYS))
        if unknown:
            raise ValueError(f"trial record: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
        missing = [k for k in ("number", "state") if d.get(k) is None]
        if missing:
            raise ValueError(f"trial record: missing key{'s' * (len(missing) > 1)} {', '.join(missing)}")
        return cls(**{**d, "params": d.get("params") or {}})


RECORD_KEYS = tuple(f.name for f in dataclasses.fields(TrialRecord))
"""trials.json's keys, in order."""


def load_trial_records(path: str | Path) -> list[TrialRecord]:
    """The records of a trials.json (a run dir's, or ``moeforge search report --json``'s ``{"trials": [...]}``).

    Raises:
        OSError: the file cannot be read. ValueError: it is not a list of records, or a record is bad
            (the trial and the key are named).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
    return records_from_json(data, str(path))


def records_from_json(data: Any, source: str = "trials.json") -> list[TrialRecord]:
    """Records from trials.json's parsed content (see `load_trial_records`)."""
    if isinstance(data, dict) and isinstance(data.get("trials"), list):
        data = data["trials"]  # `moeforge search report --json`
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{source}: expected a list of trial records (trials.json)")
    out = []
    for i, d in enumerate(data):
        try:
            out.append(TrialRecord.from_dict(d))
        except ValueError as e:
            raise ValueError(f"{source}: trial {d.get('number', f'at index {i}')}: {e}") from None
    return out


def trial_record(t: FrozenTrial) -> TrialRecord:
    """One trial as trials.json writes it (missing numbers are None)."""
    from ._trials import counted  # imports Optuna: only where a study is read

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
    if t.state.name == "FAIL" and rec["fail_reason"] is None and not rec["skipped"] and not rec["died"]:
        rec["died"] = "worker died"  # failed by a heartbeat or pid check, not by its own training
    return TrialRecord(**rec)


def trial_records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of `study` as a record, in trial order."""
    return [trial_record(t) for t in study.get_trials(deepcopy=False)]
