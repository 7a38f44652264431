"""RunSummary: summary.json read and written in one place, exactly as the trainer has always written it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moeforge.runtime import RunSummary

# written by `moeforge train debug --steps 2 --batch-size 2` before the summary was typed (run_dir shortened)
FIXTURE = Path(__file__).parents[1] / "fixtures" / "run" / "summary.json"


def test_an_old_summary_loads_and_writes_back_the_same_json():
    text = FIXTURE.read_text()
    s = RunSummary.read(FIXTURE)
    assert (s.status, s.steps, s.tokens, s.spec, s.run_dir) == ("completed", 2, 512, "debug", "runs/debug")
    assert s.spec_name is None and s.world is None
    # same keys, same order, same values: byte for byte as the trainer writes it
    assert json.dumps(s.to_dict(), indent=2) + "\n" == text
    assert RunSummary.from_dict(s.to_dict()) == s


def test_optional_keys_are_omitted_when_not_given():
    d = json.loads(FIXTURE.read_text())
    del d["spec"], d["run_dir"]
    s = RunSummary.from_dict(d)
    assert "spec" not in s.to_dict() and list(s.to_dict()) == list(d)
    searched = RunSummary.from_dict({**d, "spec_name": "t", "world": 2})
    assert list(searched.to_dict())[-2:] == ["spec_name", "world"]


def test_a_key_missing_in_an_older_file_takes_its_default():
    d = json.loads(FIXTURE.read_text())
    del d["environment"], d["processes"]  # summaries written before these keys existed
    s = RunSummary.from_dict(d)
    assert s.environment is None and s.processes == 1


def test_an_unknown_key_is_an_error_that_names_it(tmp_path):
    d = {**json.loads(FIXTURE.read_text()), "stale_key": 1}
    with pytest.raises(ValueError, match="unknown key stale_key"):
        RunSummary.from_dict(d)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"summary\.json: summary: unknown key stale_key"):
        RunSummary.read(tmp_path)  # a run dir or the file


def test_a_required_key_missing_is_an_error_that_names_it():
    d = json.loads(FIXTURE.read_text())
    del d["tokens"]
    with pytest.raises(ValueError, match="missing key tokens"):
        RunSummary.from_dict(d)
