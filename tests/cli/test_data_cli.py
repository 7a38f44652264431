"""moeforge data prepare, then train --data DIR and the shipped own-data search on the prepared folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeforge.cli import main

FAST = ["--device", "cpu", "--batch-size", "4", "--eval-tokens", "1024", "--no-progress"]


def _corpus(root: Path, n: int = 120) -> Path:
    root.mkdir()
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    for i in range(n):
        (root / f"{i:03d}.txt").write_text(" ".join(words[(i * j) % len(words)] for j in range(150)) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("data")
    src = _corpus(tmp / "src")
    out = tmp / "bpe"
    assert (
        main(
            [
                "data",
                "prepare",
                str(src),
                "--train-tokenizer",
                "300",
                "--out",
                str(out),
                "--workers",
                "1",
                "--json",
            ]
        )
        == 0
    )
    return out


def test_prepare_prints_the_summary(prepared, capsys, tmp_path):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "trained" and meta["tokenizer"]["vocab_size"] <= 300
    assert main(["data", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: no such file or folder" in err
    again = [
        str(prepared.parent / "src"),
        "--train-tokenizer",
        "300",
        "--out",
        str(prepared),
        "--no-progress",
    ]
    assert main(["data", "prepare", *again]) == 0  # the same arguments: already prepared
    assert "already prepared" in capsys.readouterr().err


def test_train_on_prepared_data_reports_tokens_per_parameter(prepared, tmp_path, capsys):
    argv = ["train", "debug", "--set", "vocab_size=300", "--data", str(prepared), "--json", *FAST]
    assert main([*argv, "--steps", "2", "--out", str(tmp_path / "r")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val_bits_per_byte"] is not None and summary["corpus"] == str(prepared)
    argv[argv.index("--json")] = "--no-progress"
    assert main([*argv, "--tokens", "1e7", "--out", str(tmp_path / "r2"), "--time", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "per parameter" in err and "epochs (repeats the data)" in err and "bpe-300" in err
    # the spec's vocabulary must cover the tokenizer's
    assert (
        main(
            ["train", "debug", "--steps", "1", "--data", str(prepared), "--out", str(tmp_path / "r3"), *FAST]
        )
        == 1
    )
    assert "vocab_size 256 does not cover the tokenizer's vocabulary" in capsys.readouterr().err


@pytest.mark.slow  # two tiny trials: about 10 s
def test_shipped_own_data_search_runs_on_prepared_data(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["search", "own-data", "--out", str(run), "--json", "--workers", "1", "--trials", "2"]
    argv += ["--budget-flops", "1e9", "--set", f"train.data={prepared}", "--set", "base.vocab_size=300"]
    argv += ["--set", "train.options.eval_tokens=1024", "--set", "train.batch_size=4"]
    assert main(argv) == 0
    trials = json.loads((run / "trials.json").read_text())
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 2 and all(t["value"] > 0 for t in done)
    # a proposal whose vocabulary does not cover the tokenizer's is infeasible, not trained
    small = tmp_path / "small"
    argv = ["search", "own-data", "--out", str(small), "--json", "--workers", "1", "--trials", "1"]
    argv += ["--budget-flops", "1e9", "--set", f"train.data={prepared}", "--set", "base.vocab_size=256"]
    main(argv)
    trials = json.loads((small / "trials.json").read_text())
    assert trials and all(t["infeasible"] for t in trials)
    assert "smaller than the data's token range" in json.dumps(trials)
