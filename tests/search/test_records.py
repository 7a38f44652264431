"""TrialRecord: trials.json read and written in one place, exactly as the search has always written it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moeforge.search import RECORD_KEYS, TrialRecord, load_trial_records

FIXTURES = Path(__file__).parents[1] / "fixtures"
# a two-trial search (fake training, two seeds) written before records were typed; trial 1 carries the
# load and environment a real run records
TRIALS = FIXTURES / "search" / "trials.json"
# an older trials.json (before load, environment, worker, ... were recorded)
OLD = FIXTURES / "scaling" / "trials.json"

# trials.json's keys as the search wrote them before records were typed, in order
KEYS_BEFORE = [
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
]


def test_the_keys_and_their_order_are_unchanged():
    assert list(RECORD_KEYS) == KEYS_BEFORE


def test_a_trials_json_from_before_loads_and_writes_back_the_same_json():
    records = load_trial_records(TRIALS)
    assert [(r.number, r.state, r.params) for r in records] == [
        (0, "COMPLETE", {"m": 2}),
        (1, "COMPLETE", {"m": 1}),
    ]
    assert records[1].load is not None and records[1].environment["torch"]
    assert records[0].seeds == [0, 1] and len(records[0].seed_values or []) == 2
    # byte for byte as write_results writes it
    assert json.dumps([r.to_dict() for r in records], indent=2, default=str) + "\n" == TRIALS.read_text()


def test_an_older_trials_json_loads_with_the_missing_keys_none():
    raw = json.loads(OLD.read_text())
    assert "environment" not in raw[0] and "worker" not in raw[0]
    records = load_trial_records(OLD)
    assert len(records) == len(raw) == 30
    assert records[0].environment is None and records[0].worker is None and records[0].load is None
    # every key it had comes back unchanged
    assert all(
        {k: v for k, v in r.to_dict().items() if k in d} == d for r, d in zip(records, raw, strict=True)
    )


def test_report_json_form_loads_too(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"trials": json.loads(TRIALS.read_text())}))
    assert load_trial_records(path) == load_trial_records(TRIALS)


def test_an_unknown_key_is_an_error_that_names_it_and_the_trial(tmp_path):
    raw = json.loads(TRIALS.read_text())
    raw[1]["stale_key"] = 1
    path = tmp_path / "trials.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"trials\.json: trial 1: trial record: unknown key stale_key"):
        load_trial_records(path)
    with pytest.raises(ValueError, match="unknown key stale_key"):
        TrialRecord.from_dict(raw[1])


def test_a_record_without_number_or_state_is_an_error():
    with pytest.raises(ValueError, match="missing key state"):
        TrialRecord.from_dict({"number": 3})
