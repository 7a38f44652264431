"""`moeforge train` and `moeforge eval`: run dirs, resume, exit statuses, one-line errors."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from moeforge.compiler import account, load_spec

from moeforge.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FAIL, main

FAST = ["--device", "cpu", "--batch-size", "4", "--eval-tokens", "1024", "--no-progress"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_train_resume_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    fpt = account(load_spec("debug")).train_flops_per_token
    budget = 5 * 4 * 128 * fpt
    assert main(["train", "debug", "--budget-flops", str(budget), "--out", str(out), "--json", *FAST]) == 0
    s1 = _json_out(capsys)
    assert s1["tokens"] == 5 * 4 * 128 and s1["budget_flops"] == budget and s1["spec"] == "debug"
    assert {p.name for p in out.iterdir()} >= {
        "spec.yaml",
        "train_config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoint",
    }
    assert yaml.safe_load((out / "spec.yaml").read_text())["name"] == "debug"

    # the spec, batch size and data come from the run dir; only the budget changes
    assert (
        main(
            [
                "train",
                "--resume",
                "--out",
                str(out),
                "--budget-flops",
                str(2 * budget),
                "--json",
                "--no-progress",
            ]
        )
        == 0
    )
    s2 = _json_out(capsys)
    assert s2["tokens"] == 2 * s1["tokens"] and s2["steps"] == 10 and s2["config"]["batch_size"] == 4
    assert s2["initial_val_loss"] == s1["initial_val_loss"]

    assert (
        main(
            ["eval", str(out), "--checkpoint", str(out), "--device", "cpu", "--eval-tokens", "1024", "--json"]
        )
        == 0
    )
    ev = _json_out(capsys)
    assert ev["val_loss"] == pytest.approx(s2["final_val_loss"], rel=1e-5)
    assert ev["val_bits_per_byte"] is not None

    # a run dir is never overwritten by a new run
    assert main(["train", "debug", "--steps", "1", "--out", str(out), *FAST]) == EXIT_BAD_INPUT
    assert "--resume" in capsys.readouterr().err

    # resuming keeps the run's data and seed: another one is refused, in one line
    for flag, value in (("--seed", "1"), ("--data", str(tmp_path / "other.txt"))):
        argv = ["train", "--resume", "--out", str(out), flag, value, "--budget-flops", str(3 * budget)]
        assert main(argv) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip()
        assert flag in err and "would change the run" in err and len(err.splitlines()) == 1

    # the checkpoint is checked against the model built on the meta device: a 16B model is never allocated
    t0 = time.perf_counter()
    assert main(["eval", "deepseekmoe-16b", "--checkpoint", str(out), "--device", "cpu"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "does not match the model" in err and len(err.splitlines()) == 1
    assert time.perf_counter() - t0 < 10


def test_divergence_exits_3_with_one_line(tmp_path, capsys):
    code = main(["train", "debug", "--steps", "6", "--lr", "1e6", "--out", str(tmp_path / "r"), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_DIVERGED
    assert "diverged" in err and len(err.splitlines()) == 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "diverged"


def test_bad_data_exits_1_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert (
        main(["train", "debug", "--steps", "1", "--data", str(empty), "--out", str(tmp_path / "r"), *FAST])
        == EXIT_FAIL
    )
    err = capsys.readouterr().err.strip()
    assert "empty.txt" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "debug", "--device", "cpu"],  # no budget
        ["train", "--resume", "--steps", "1"],  # no run dir
        ["eval", "debug", "--checkpoint", "/nonexistent/run"],
    ],
)
def test_bad_input_exits_2(argv, capsys):
    assert main(argv) == EXIT_BAD_INPUT
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
