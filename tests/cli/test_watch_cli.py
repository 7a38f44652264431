"""`--log` on the command line: a tracker whose library is missing is one line naming the extra, exit 2,
before anything is trained or written (`train`, `train --nproc`, `search`)."""

from __future__ import annotations

import importlib.util

import pytest

from moeforge.cli import EXIT_BAD_INPUT, main


@pytest.fixture
def no_mlflow(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "debug", "--steps", "2", "--device", "cpu"],
        ["train", "debug", "--steps", "2", "--device", "cpu", "--nproc", "2"],
        ["search", "quickstart"],
    ],
)
def test_missing_tracker_library_is_one_line_and_exit_2(argv, no_mlflow, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out), "--log", "mlflow"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err == (
        f"moeforge {argv[0]}: --log mlflow: the mlflow package is not installed: pip install 'moeforge[mlflow]'"
    )
    assert not out.exists()


def test_unknown_tracker_is_refused_by_the_parser(capsys):
    assert main(["train", "debug", "--steps", "2", "--log", "neptune"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeforge train: --log: invalid choice: 'neptune'") and len(err.splitlines()) == 1
