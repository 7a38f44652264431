"""Results say what makes them comparable, and on one machine a search repeats to the last digit."""

import json

import pytest
import torch
from moeforge.search import RunConfig, run_search

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_search_twice_gives_the_same_digits_and_records_its_environment(make_search, tmp_path):
    s = make_search(
        space="  granularity: [1, 2]",
        n_trials=2,
        extra="train: {device: cpu, batch_size: 4, eval_points: 1, cpu_threads: 1, options: {eval_tokens: 1024}}",
    )
    runs = []
    for name in ("a", "b"):
        run_search(s, RunConfig(tmp_path / name, workers=1, plots=False))
        trials = json.loads((tmp_path / name / "trials.json").read_text())
        assert isinstance(trials, list)  # the shape older readers load
        runs.append({t["params"]["m"]: t for t in trials if t["state"] == "COMPLETE"})
    a, b = runs
    assert set(a) == set(b) == {1, 2}
    for m in a:
        assert a[m]["value"] == b[m]["value"]  # exactly: the same digits, not approximately
        assert a[m]["initial_val_loss"] == b[m]["initial_val_loss"]
        env = a[m]["environment"]
        assert env["torch"] == torch.__version__ and env["threads"] == 1
        assert env["device"].startswith("cpu (") and env["moeforge"]
        assert a[m]["data_fingerprint"]
    header = (tmp_path / "a" / "best.yaml").read_text().split("\nname:")[0]
    best = min(a.values(), key=lambda t: t["value"])
    assert f"torch {torch.__version__}, {best['environment']['device']}, 1 threads" in header
    assert f"data fingerprint {best['data_fingerprint']}" in header
    assert "another order" in header


def test_trials_json_without_environment_still_loads(make_search, tmp_path):
    """A run dir written before environments were recorded: its records load, best.yaml says nothing."""
    from moeforge.search import TrialRecord
    from moeforge.search._results import comparable_on

    old = TrialRecord.from_dict({"number": 0, "state": "COMPLETE"})  # keys missing in older files are None
    assert comparable_on(old) == ""
    with_data = TrialRecord(number=0, state="COMPLETE", data_fingerprint="abc")
    assert comparable_on(with_data).startswith("\nTrained with data fingerprint abc.")
