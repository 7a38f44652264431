"""`moeforge scaling fit / predict`: JSON keys, human tables, files, and one-line errors with exit 2 / 1."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from moeforge.search._scaling.fit import LBFGSB_OPTIONS

from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL, main

FIXTURE = Path(__file__).parents[1] / "fixtures" / "scaling" / "trials.json"
FIT_KEYS = {"law", "n_points", "constants", "ci", "rmse", "holdout"}
PREDICT_KEYS = {"budget_flops", "params", "tokens", "granularity", "loss", "loss_ci"}


@pytest.fixture(scope="module")
def chinchilla_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IsoFLOP runs from Chinchilla's law at 3 budgets, 2 seeds each, 0.5% noise."""
    rng = np.random.default_rng(1)
    lines = ["params,tokens,loss,flops,seed,note"]
    for c in (1e17, 1e18, 1e19):
        for f in np.exp(np.linspace(-1.2, 1.2, 5)):
            n = math.sqrt(c / 120) * f
            d = c / (6 * n)
            for seed in (0, 1):
                loss = (1.82 + 482 / n**0.35 + 2085 / d**0.37) * math.exp(0.005 * rng.standard_normal())
                lines.append(f"{n:.6g},{d:.6g},{loss:.6f},{c:g},{seed},x")
    path = tmp_path_factory.mktemp("csv") / "runs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)  # --json prints only JSON


def test_fit_trials_json_keys_files_and_predict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "fit"
    got = run_json(
        capsys,
        "scaling",
        "fit",
        str(FIXTURE),
        "--json",
        "--resamples",
        "6",
        "--out",
        str(out),
        "--target",
        "1e14",
    )
    assert set(got) >= FIT_KEYS
    assert got["law"] == "krajewski"  # three granularities in the runs
    assert list(got["constants"]) == ["c", "a", "b", "g", "alpha", "beta", "gamma"]
    assert list(got["ci"]) == list(got["constants"]) and all(len(v) == 2 for v in got["ci"].values())
    assert got["n_points"] == 54 and got["n"] == "activated_non_embedding"
    assert set(got["holdout"]) >= {"budget", "mean_abs_rel_error"} and got["holdout"]["budget"] == 1e12
    assert got["holdout"]["mean_abs_rel_error"] < 0.03
    rows = got["configurations"]
    assert len(rows) == 27 and sum(r["best"] for r in rows) == 3  # one best per budget
    saved = json.loads((out / "fit.json").read_text())
    assert (
        len(saved["samples"]) == 6
        and saved["source"] == str(FIXTURE)
        and saved["constants"] == got["constants"]
    )
    for name in ("isoflop", "loss_vs_G", "residuals", "extrapolation"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.html").is_file()
    pred = run_json(capsys, "scaling", "predict", str(out / "fit.json"), "--budget", "1e14", "--json")
    assert set(pred) >= PREDICT_KEYS and pred["method"] == "6N" and pred["granularity"] == 16
    assert pred["params"] * pred["tokens"] * 6 == pytest.approx(1e14)
    assert pred["loss_ci"][0] <= pred["loss"] <= pred["loss_ci"][1]
    assert main(["scaling", "predict", str(out / "fit.json"), "--budget", "1e14"]) == 0
    assert "N* =" in capsys.readouterr().out


def test_fit_and_predict_a_csv(capsys: pytest.CaptureFixture[str], chinchilla_csv: Path) -> None:
    got = run_json(capsys, "scaling", "fit", str(chinchilla_csv), "--json", "--resamples", "8")
    assert got["law"] == "chinchilla"  # no granularity column
    assert list(got["constants"]) == ["E", "A", "B", "alpha", "beta"] and got["n_points"] == 30
    assert got["constants"]["alpha"] == pytest.approx(0.35, abs=0.05)
    assert got["holdout"]["budget"] == 1e19 and got["holdout"]["mean_abs_rel_error"] < 0.01
    pred = run_json(
        capsys, "scaling", "predict", str(chinchilla_csv), "--budget", "1e21", "--resamples", "4", "--json"
    )
    assert set(pred) >= PREDICT_KEYS and pred["granularity"] is None and pred["law"] == "chinchilla"


def test_fit_table_marks_ties_and_published_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scaling", "fit", str(FIXTURE), "--resamples", "2"]) == 0
    out = capsys.readouterr().out
    assert "Krajewski et al." in out and "0.115" in out and "0.147" in out and "0.58" in out
    assert "budget 1e+12 FLOPs" in out
    # rows of the table, not the tie rule printed under it (which names both words)
    assert re.search(r"^#\d+ .*\bbest\s*$", out, re.M) and re.search(r"^#\d+ .*\btied\s*$", out, re.M)
    assert "RMSE" in out and "holdout: fitted without the 1e+12 budget" in out


def test_predict_spec_realizes_the_optimum(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from moeforge.compiler import account, load_spec
    from moeforge.search import fit_law, load_search, load_trial_records, runs_from_records

    yaml = tmp_path / "ladder.yaml"
    yaml.write_text(
        "name: ladder\nbase:\n  base: debug\n  moe: {paper: {experts: 4, top_k: 1, m: 1, shared: 0}}\n"
        "space:\n  granularity: [1, 2, 4]\n  size: [0.5, 1, 2]\n"
        "budget: {train_flops: [1.0e+11, 3.0e+11, 1.0e+12]}\nsampler: {kind: grid, seed: 0}\nn_trials: 4\n"
    )
    search = load_search(yaml)
    runs = runs_from_records(load_trial_records(FIXTURE), source=str(FIXTURE), search=search)
    f = fit_law(runs, resamples=4, holdout=False)
    (tmp_path / "fit.json").write_text(json.dumps(f.to_json()))
    out = tmp_path / "opt.yaml"
    got = run_json(
        capsys, "scaling", "predict", str(tmp_path / "fit.json"), "--budget", "1e14", "--granularities", "1,2,4",
        "--spec", str(out), "--json",
    )  # fmt: skip
    assert got["method"] == "accounting" and got["spec"] == str(out)
    spec = load_spec(out)
    acc = account(spec)
    assert acc.params_activated_non_embedding == got["params"]
    assert got["tokens"] == pytest.approx(1e14 / acc.train_flops_per_token)
    assert spec.moe_derived.m == got["granularity"]
    assert out.read_text().startswith("# Compute-optimal model at 1e+14 training FLOPs")


def bad_inputs(tmp: Path, csv: Path) -> list[tuple[list[str], int, str]]:
    missing_col = tmp / "missing.csv"
    missing_col.write_text("params,loss\n1e6,3\n")
    words = tmp / "words.csv"
    words.write_text("params,tokens,loss\n1e6,2e7,3.1\n2e6,2e7,three\n")
    few = tmp / "few.csv"
    few.write_text("params,tokens,loss\n1e6,2e7,3.1\n2e6,2e7,3.0\n4e6,2e7,2.9\n")
    return [
        (["scaling", "fit", str(tmp / "nope.csv")], EXIT_BAD_INPUT, r"nope.csv: no such file or directory"),
        (["scaling", "fit", str(missing_col)], EXIT_BAD_INPUT, r"missing.csv:1: column tokens: missing"),
        (
            ["scaling", "fit", str(words)],
            EXIT_BAD_INPUT,
            r"words.csv:3: column loss: 'three' is not a number",
        ),
        (
            ["scaling", "fit", str(few)],
            EXIT_BAD_INPUT,
            r"chinchilla has 5 constants but the data have 3 runs",
        ),
        (
            ["scaling", "fit", str(csv), "--law", "krajewski"],
            EXIT_BAD_INPUT,
            r"krajewski needs the granularity G",
        ),
        (
            [
                "scaling",
                "predict",
                str(csv),
                "--budget",
                "1e20",
                "--spec",
                str(tmp / "x.yaml"),
                "--resamples",
                "0",
            ],
            EXIT_BAD_INPUT,
            r"--spec needs a fit of a search's runs",
        ),  # fmt: skip
    ]


def test_bad_inputs_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, chinchilla_csv: Path
) -> None:
    for argv, code, message in bad_inputs(tmp_path, chinchilla_csv):
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("moeforge scaling: ") and "\n" not in err, err
        assert __import__("re").search(message, err), (message, err)


def test_a_fit_that_does_not_converge_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, chinchilla_csv: Path
) -> None:
    monkeypatch.setitem(LBFGSB_OPTIONS, "maxiter", 1)
    assert main(["scaling", "fit", str(chinchilla_csv)]) == EXIT_FAIL
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeforge scaling: the chinchilla fit did not converge") and "\n" not in err


def test_bad_losses_are_dropped_with_a_warning(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, chinchilla_csv: Path
) -> None:
    lines = chinchilla_csv.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[2], "nan")
    lines[5] = lines[5].replace(lines[5].split(",")[2], "0")
    path = tmp_path / "holes.csv"
    path.write_text("\n".join(lines) + "\n")
    assert main(["scaling", "fit", str(path), "--json", "--resamples", "0"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)  # the warning stays out of the JSON
    assert got["n_points"] == 28 and got["dropped"] == ["holes.csv:3 (loss 'nan')", "holes.csv:6 (loss '0')"]
    assert out.err.strip() == (
        "moeforge scaling: warning: dropped 2 run(s) with a non-finite or non-positive loss: "
        "holes.csv:3 (loss 'nan'), holes.csv:6 (loss '0')"
    )


def test_no_traceback_from_the_command_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("params,tokens,loss\n1e6,2e7,x\n")
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "scaling", "fit", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == EXIT_BAD_INPUT and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"moeforge scaling: {bad}:2: column loss: 'x' is not a number"
