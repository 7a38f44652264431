"""Several processes on CPU (gloo, torchrun): DDP and FSDP2 train what one process trains, checkpoints resume
across world sizes, and a process that dies stops the whole run.

Each test starts torchrun in a subprocess (`--standalone` picks a free port); the debug model keeps each
under ~25 s on 2 busy cores. Measured against the one-process run on the same global batch (fp32, 6 steps):
DDP's per-step losses and final weights are bitwise equal (selection biases included, whose counts are
all-reduced); FSDP2's losses are equal and its weights within 6e-8 (its reduce-scatter sums in another
order). The tolerances, 1e-6, leave an order of magnitude and still catch a rank that updates its selection
biases from its own counts only (2e-5 off in the loss).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dist_worker  # tests/runtime is on sys.path (pytest's prepend import mode)
import pytest
from moeforge.runtime import load_corpus
from safetensors.torch import load_file

from moeforge.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(dist_worker.__file__)
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 1e-6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every process: one corpus cache, built once here."""
    cache = tmp_path_factory.mktemp("cache")
    load_corpus(cache_dir=cache, vocab_size=256)
    old = os.environ.get("MOEFORGE_CACHE")
    os.environ["MOEFORGE_CACHE"] = str(cache)
    yield {**os.environ, "MOEFORGE_CACHE": str(cache)}
    if old is None:
        del os.environ["MOEFORGE_CACHE"]
    else:
        os.environ["MOEFORGE_CACHE"] = old


def _torchrun(env: dict, *args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _worker(env: dict, nproc: int, **options) -> None:
    if nproc == 1:
        dist_worker.run(options)
        return
    r = _torchrun(env, str(WORKER), json.dumps(options), nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def _assert_same(a: Path, b: Path) -> tuple[float, float]:
    """The two runs logged the same losses and ended with the same weights; returns the largest differences."""
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 6
    loss_diff = max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True))
    assert loss_diff < LOSS_RTOL, (la, lb)
    wa, wb = (
        load_file(str(a / "checkpoint" / "model.safetensors")),
        load_file(str(b / "checkpoint" / "model.safetensors")),
    )
    assert wa.keys() == wb.keys()
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert weight_diff < WEIGHT_ATOL
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["final_val_loss"] == pytest.approx(sb["final_val_loss"], rel=LOSS_RTOL)
    assert sa["tokens"] == sb["tokens"] and sa["steps"] == sb["steps"]
    # load statistics are the run's, summed over ranks
    assert sa["load"]["layers"] == sb["load"]["layers"]
    return loss_diff, weight_diff


BIAS = ["moe.gate.score=sigmoid", "moe.gate.selection_bias=true", "moe.gate.bias_update_speed=0.01"]


# 5 steps of 8 sequences and a last step of one 50-token sequence: rank 1 has nothing to read in it
SHORT_LAST_STEP = 5 * 8 * 128 + 50


@pytest.fixture(scope="module")
def references(env, tmp_path_factory) -> Callable[..., Path]:
    """One-process runs, made once each: 6 steps of a global batch of 8 in micro-batches of 4 (a rank's
    share on 2 processes), or `tokens`; keyed by their options."""
    runs: dict[str, Path] = {}

    def reference(**options) -> Path:
        key = json.dumps(options, sort_keys=True)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("one") / "run"
            dist_worker.run({"out": str(runs[key]), **options})
        return runs[key]

    return reference


@pytest.fixture(scope="module")
def one_process(references) -> Path:
    return references()


@pytest.mark.parametrize(
    ("parallel", "options"),
    [
        # DeepSeek-V3's selection biases: their sign rule must see every rank's routing counts
        ("ddp", {"set": BIAS}),
        # a short last step that leaves rank 1 no rows: it still joins every forward's collectives
        ("fsdp", {"tokens": SHORT_LAST_STEP}),
    ],
    ids=["ddp-selection-bias", "fsdp-short-last-step"],
)
def test_two_processes_train_what_one_does(env, references, tmp_path, parallel, options):
    out = tmp_path / parallel
    _worker(env, 2, out=str(out), parallel=parallel, **options)
    _assert_same(references(**options), out)
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


@pytest.mark.parametrize(("first", "second", "parallel"), [(2, 1, "fsdp"), (1, 2, "ddp")])
def test_resume_across_world_sizes(env, one_process, tmp_path, first, second, parallel):
    out = tmp_path / "run"
    # stopped at the middle evaluation (after step 3, before its checkpoint), resumed with another world size
    _worker(env, first, out=str(out), parallel=parallel, stop_at=0.5)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    _worker(env, second, out=str(out), parallel=parallel, resume=True)
    _assert_same(one_process, out)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes in /proc")
def test_a_killed_rank_stops_every_rank_with_a_message(env, tmp_path):
    out = tmp_path / "run"
    args = ["train", "debug", "--steps", "100000", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "moeforge",
    ]
    proc = subprocess.Popen(
        [*cmd, *args, "--eval-tokens", "1024", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists():  # training is under way after the first evaluation
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        [rank1] = [p for p in _children(proc.pid) if _rank(p) == 1]
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    # rank 0 learns it first from gloo (a connection reset) or from torchrun's SIGTERM
    said = [line for line in err.splitlines() if line.startswith("moeforge train: rank 0: ")]
    assert said and ("another process of the run" in said[0]), err[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"].startswith("failed")


def test_nproc_starts_torchrun(env, one_process, tmp_path, capfd):
    out = tmp_path / "run"
    argv = ["train", "debug", "--nproc", "2", "--steps", "6", "--batch-size", "8", "--device", "cpu"]
    assert main([*argv, "--eval-tokens", "1024", "--no-progress", "--json", "--out", str(out)]) == 0
    s = json.loads(capfd.readouterr().out)
    assert s["processes"] == 2 and s["steps"] == 6
    ref = json.loads((one_process / "summary.json").read_text())
    assert s["final_val_loss"] == pytest.approx(ref["final_val_loss"], rel=LOSS_RTOL)
    wa = load_file(str(out / "checkpoint" / "model.safetensors"))
    wb = load_file(str(one_process / "checkpoint" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < WEIGHT_ATOL
