"""The search leaderboard fits the console (80 columns when not a terminal); --wide shows every column."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import moeforge.search
import pytest
from moeforge.search import RECORD_KEYS, SearchResult, TrialRecord, load_search
from rich.console import Console

from moeforge.cli import main
from moeforge.commands.search import render

SPACE = {  # six dotted keys, as a search over any model spec key names them
    "moe.balance.expert_alpha": 0.012345678,
    "attention.n_heads": 8,
    "moe.top_k": 2,
    "ffn.hidden": 256,
    "positions.theta": 10000.0,
    "moe.paper.m": 4,
}
STATS = ["experts", "params", "activated", "tokens"]
SUMMARY = SearchResult(trials=6, counted=4, complete=3, failed=1, best=None, plots=[])
BEST = ["0.01235", "8", "2", "256", "1e+04", "4"]  # SPACE's values as the leaderboard writes them


def record(number: int, value: float | None, state: str = "COMPLETE", **kw: Any) -> TrialRecord:
    """A trials.json record: every key present, as `trial_record` writes it."""
    rec: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    rec.update(number=number, state=state, value=value, params=dict(SPACE), counted=state == "COMPLETE")
    if value is not None:
        rec.update(
            value_std=0.0123,
            seeds=[0, 1, 2],
            seed_values=[value - 0.0123, value, value + 0.0123],
            routed_experts=63,
            shared_experts=2,
            top_k=6,
            params_total=16_375_728_128,
            params_activated=2_826_522_624,
            tokens=1_234_567_890,
        )
    rec.update(kw)
    return TrialRecord.from_dict(rec)


def records(params: dict[str, Any] = SPACE) -> list[TrialRecord]:
    rs = [
        record(0, 3.51234, seed_values=[3.41234, 3.51234, 3.61234]),  # within the seed noise of #3
        record(1, None, "FAIL", fail_reason="CUDA out of memory while training " + "x/" * 40),
        record(2, None, "PRUNED", infeasible="activated params 3.1B > 2.8B (budget.max_activated)"),
        record(3, 3.41234, params={**SPACE, "moe.balance.expert_alpha": 0.001}),  # the best
        record(4, 3.41234, reused_from=3),
        record(5, 3.9, params={**SPACE, "attention.n_heads": 16, "positions.theta": 5e5}),
    ]
    return [dataclasses.replace(r, params={k: r.params.get(k, v) for k, v in params.items()}) for r in rs]


def search(seeds: tuple[int, ...] = (0, 1, 2)) -> Any:
    return load_search("quickstart").model_copy(update={"seeds": seeds})


def rendered(rs: list[TrialRecord], width: int = 80, wide: bool = False, seeds=(0, 1, 2)) -> list[str]:
    buf = io.StringIO()
    render(rs, search(seeds), wide=wide, con=Console(file=buf, width=width))
    return buf.getvalue().splitlines()


def row(lines: list[str], number: str) -> list[str]:
    (line,) = [line for line in lines if line.split()[:1] == [number]]
    return line.split()


def test_many_dotted_params_fit_80_columns() -> None:
    lines = rendered(records())
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    head = next(line.split() for line in lines if "state" in line.split())
    assert head == [
        "#",
        "state",
        "val_loss",
        "vs",
        "best",
        "expert_alpha",
        "n_heads",
        "top_k",
        "hidden",
        "theta",
    ]
    assert row(lines, "3") == ["3", "done", "3.4123", "best", "0.001", *BEST[1:-1]]  # the best first
    assert row(lines, "0") == ["0", "done", "3.5123", "tied", *BEST[:-1]]
    assert row(lines, "5")[2:] == ["3.9000", "0.01235", "16", "2", "256", "5e+05"]  # beyond the noise
    assert row(lines, "1*")[:3] == ["1*", "failed", "-"]
    assert row(lines, "2*")[:2] == ["2*", "infeasible"]
    assert row(lines, "4*")[:2] == ["4*", "done"]
    text = "\n".join(lines).replace("\n  ", " ")  # the lines under the table, unwrapped
    # legend: short -> full name; what was hidden to fit, and how to see it
    assert "expert_alpha=moe.balance.expert_alpha" in text and "n_heads=attention.n_heads" in text
    assert "tied: the gap to the best mean is under" in text
    assert "± seeds, moe.paper.m, experts, params, activated, tokens" in text and "--wide shows all" in text
    assert "#4: same spec as #3" in text and "#2: activated params 3.1B" in text
    assert "#1: CUDA out of memory" in text


def test_wide_shows_every_column_under_its_full_name() -> None:
    lines = rendered(records(), wide=True)
    head = next(line.split() for line in lines if "state" in line.split())
    assert head == ["#", "state", "val_loss", "±", "seeds", "vs", "best", *SPACE, *STATS]
    stats = ["2+6/63", "16.38B", "2.827B", "1.235B"]
    assert row(lines, "3") == ["3", "done", "3.4123", "0.0123", "best", "0.001", *BEST[1:], *stats]
    assert max(map(len, lines)) > 80
    text = "\n".join(lines)
    assert "columns:" not in text and "hidden to fit" not in text


def test_a_small_space_fits_as_it_is() -> None:
    lines = rendered(records({"m": 2, "K_s": 1}), seeds=(0,))
    head = next(line.split() for line in lines if "state" in line.split())
    assert head == ["#", "state", "val_loss", "m", "K_s", *STATS]
    assert max(map(len, lines)) <= 80
    text = "\n".join(lines)
    assert "columns:" not in text and "hidden to fit" not in text
    assert "1 seed: no noise estimate" in text


def test_colliding_short_names_keep_a_parent_and_params_go_last_first() -> None:
    params = {"moe.top_k": 2, "moe.paper.top_k": 1, "moe.balance.expert_alpha": 0.01}
    lines = rendered(records(params), width=50)
    assert max(map(len, lines)) <= 50, "\n".join(lines)
    head = next(line.split() for line in lines if "state" in line.split())
    assert head == ["#", "state", "val_loss", "vs", "best", "moe.top_k"]
    text = "\n".join(lines).replace("\n  ", " ")
    assert "hidden to fit 50 columns: ± seeds, moe.paper.top_k, moe.balance.expert_alpha, experts" in text


@pytest.mark.parametrize(("flags", "files"), [([], "trials.csv, plots/)"), (["--no-plots"], "trials.csv)")])
def test_results_line_names_plots_only_when_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags, files
) -> None:
    monkeypatch.setattr(moeforge.search, "run_search", lambda search, cfg: SUMMARY)
    monkeypatch.setattr(moeforge.search, "report", lambda *a, **kw: (search(), records()))
    assert main(["search", "quickstart", "--out", str(tmp_path), *flags]) == 0
    out = capsys.readouterr().out
    assert f"results: {tmp_path}/ (best.yaml, trials.json, {files}" in out
