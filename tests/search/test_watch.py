"""A search people can watch: the live display (trials, failures, best so far with its parameters, time),
and every trial's curves as one run of the study's group in the trackers (``--log``)."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
from fakes import fake_evaluator
from moeforge.search import RunConfig, run_search
from moeforge.search._progress import SearchProgress
from optuna.trial import TrialState, create_trial
from rich.console import Console


def _text(display: SearchProgress) -> str:
    con = Console(file=io.StringIO(), width=160, color_system=None)
    con.print(display.render())
    return con.file.getvalue()


def test_display_counts_failures_best_and_eta(make_search):
    s = make_search(n_trials=5)
    study = optuna.create_study(directions=s.directions)
    dist = {"m": optuna.distributions.CategoricalDistribution([1, 2, 4])}
    for m, value, state in (
        (1, 2.5, TrialState.COMPLETE),
        (2, 2.25, TrialState.COMPLETE),
        (4, None, TrialState.FAIL),
    ):
        study.add_trial(
            create_trial(
                params={"m": m},
                distributions=dist,
                value=value,
                state=state,
                user_attrs={"counted": True, **({"fail_reason": "diverged"} if value is None else {})},
            )
        )
    display = SearchProgress(s, done_before=1, enabled=True, log=print)
    display._live = object()  # as if started (no terminal here): update() reads the study
    display.update(study)
    display.t0 -= 120  # two minutes for the 2 trials done since the start: 2 more trials take ~2 min
    text = _text(display)
    assert "3/5 trials done" in text and "0 running, 1 failed; elapsed 2:00, left ~2:00" in text
    assert "best so far: trial 1, val_loss 2.2500 (m=2)" in text


def test_display_off_keeps_the_log_lines(make_search, tmp_path):
    lines: list[str] = []
    s = make_search(n_trials=2)
    display = SearchProgress(s, 0, enabled=False, log=lines.append)
    with display:
        display.log("[w0] trial 0: done")
        display.update(optuna.create_study())  # no-op when off
    assert lines == ["[w0] trial 0: done"] and display.done == 0


def test_search_with_the_display_on(make_search, tmp_path, capsys):
    """run_search with progress on: the log lines and the final display (best so far) reach stderr."""
    s = make_search(n_trials=2)
    run_search(s, RunConfig(tmp_path / "run", plots=False, progress=True), evaluate=fake_evaluator(0))
    err = capsys.readouterr().err
    assert "2/2 trials done" in err and "0 running, 0 failed" in err and "best so far: trial" in err
    assert "[w0] trial 0" in err  # the log lines print too, above the display


@pytest.mark.slow
def test_trials_are_runs_of_the_study_with_their_parameters(tmp_path, monkeypatch):
    """`search --log tensorboard`: one TensorBoard run per trial under the study, tagged with its params."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from moeforge.cli import main

    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "watch.yaml"
    tiny = Path(__file__).parents[1] / "fixtures" / "search" / "tiny.yaml"
    spec.write_text(tiny.read_text().replace("cli", "watch", 1))
    out = tmp_path / "run"
    argv = ["search", str(spec), "--out", str(out), "--workers", "1", "--no-plots", "--json"]
    assert main([*argv, "--study", "my-study", "--log", "tensorboard"]) == 0
    runs = sorted(Path(p).parent for p in (out / "tensorboard" / "my-study").glob("trial-*/seed-0/events.*"))
    assert [r.parent.name for r in runs] == ["trial-0", "trial-1"]
    ms = set()
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        assert {"train/loss", "eval/val_loss", "load/max_cv"} <= set(acc.Tags()["scalars"])
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        ms.add(info.hparams["m"].number_value)
    assert ms == {1, 2}
