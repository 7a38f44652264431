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


# ---------------------------------------------------------------------------------------- budget floor
@pytest.fixture
def floor(monkeypatch):
    """The budget floor users get (the suite lifts it in tests/conftest.py)."""
    monkeypatch.delenv("MOEFORGE_MIN_STEPS", raising=False)


@pytest.mark.parametrize(
    ("flag", "value", "smallest"),
    [
        # debug: 718,848 training FLOPs per token; 20 steps x 16 x 128 tokens = 40,960 tokens = 2.944e10
        ("--budget-flops", "1e6", "2.95e+10"),
        ("--budget-flops", "1", "2.95e+10"),
        ("--tokens", "40959", "40,960"),
    ],
)
def test_train_refuses_a_budget_too_small_to_train(tmp_path, capsys, floor, flag, value, smallest):
    out = tmp_path / "r"
    assert main(["train", "debug", flag, value, "--out", str(out), "--device", "cpu"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"moeforge train: {flag} ")
    assert "20 optimizer steps of 16 x 128" in err and err.endswith(
        f"the smallest budget that trains them is {smallest}"
    )
    assert not out.exists()  # nothing was built or written


def test_train_budget_floor_follows_the_batch(tmp_path, capsys, floor, monkeypatch):
    """The floor is in steps of the run's own batch: --batch-size 4 needs 20 x 4 x 128 tokens."""
    argv = ["train", "debug", "--tokens", "10239", "--batch-size", "4", "--out", str(tmp_path / "r")]
    assert main(argv) == EXIT_BAD_INPUT
    assert "smallest budget that trains them is 10,240" in capsys.readouterr().err
    monkeypatch.setenv("MOEFORGE_MIN_STEPS", "x")
    assert main(argv) == EXIT_BAD_INPUT
    assert "$MOEFORGE_MIN_STEPS: 'x'" in capsys.readouterr().err


def test_search_below_the_floor_exits_2_without_training(tmp_path, capsys, floor):
    out = tmp_path / "s"
    assert main(["search", "quickstart", "--budget-flops", "1e6", "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every candidate of 'quickstart' would train too few steps" in err
    assert "smallest budget that trains them is" in err
    assert not out.exists()


def test_report_says_a_budget_is_below_the_floor(capsys, floor):
    argv = ["report", "debug", "--data", "bundled", "--budget-flops", "1e6"]
    assert main([*argv, "--json"]) == 0
    why = json.loads(capsys.readouterr().out)["data"]["budget_too_small"]
    assert why.endswith("the smallest budget that trains them is 2.95e+10")
    assert main(argv) == 0
    assert (
        f"budget too small to train (at the default batch): --budget-flops {why}" in capsys.readouterr().out
    )
    assert main(["report", "debug", "--data", "bundled", "--budget-flops", "3e10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["budget_too_small"] is None


# ------------------------------------------------------------------------------- eval of a run dir's data
def test_eval_of_a_run_dir_uses_the_data_it_trained_on(tmp_path, capsys, monkeypatch):
    """A run trained on a prepared dataset is evaluated there, from any folder; another --data is said in
    one line and used."""
    src = tmp_path / "src"
    src.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(60):
        (src / f"{i:02d}.txt").write_text(" ".join(words[(i * j) % len(words)] for j in range(120)) + "\n")
    data = tmp_path / "ds"
    assert main(["data", "prepare", str(src), "--out", str(data), "--workers", "1", "--json"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the run records "ds" relative; eval runs from elsewhere below
    run = tmp_path / "run"
    argv = ["train", "debug", "--steps", "2", "--data", "ds", "--out", str(run), "--json", *FAST]
    assert main(argv) == 0
    s = _json_out(capsys)
    monkeypatch.chdir(src)
    ev_argv = ["eval", str(run), "--checkpoint", str(run), "--device", "cpu", "--eval-tokens", "1024"]
    assert main([*ev_argv, "--json"]) == 0
    captured = capsys.readouterr()
    ev = json.loads(captured.out)
    assert captured.err == ""  # the run's own data: nothing to say
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["data"] == "ds" and recorded["data_path"] == str(data)
    assert ev["run_data"] is True and ev["data_fingerprint"] == recorded["data_fingerprint"]
    assert ev["val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)

    # elsewhere on purpose: one note, and the value of that data
    assert main([*ev_argv, "--data", "bundled", "--json"]) == 0
    captured = capsys.readouterr()
    other = json.loads(captured.out)
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moeforge eval: note: evaluating on bundled:stdlib")
    assert f"not the data {run} trained on" in err
    assert other["run_data"] is False and other["val_loss"] != pytest.approx(ev["val_loss"], rel=1e-3)
