"""Two worker processes share one study on a real PostgreSQL server; a killed worker's trial is retried.

The server runs on 127.0.0.1 in a temp dir, as an unprivileged user when the tests run as root
(initdb and pg_ctl refuse root), and is stopped with `pg_ctl stop -m immediate` at the end.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH")
    # Not under pytest's tmp dir: that is private to root, and the server runs as another user.
    base = Path(tempfile.mkdtemp(prefix="moeforge-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to drop privileges for initdb")
        prefix = ["runuser", "-u", "nobody", "--"]
        os.chmod(base, 0o777)
        os.chmod(sock, 0o777)
    subprocess.run(
        [*prefix, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off"
    subprocess.run(
        [*prefix, "pg_ctl", "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            ["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "moe"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/moe"
    finally:
        subprocess.run([*prefix, "pg_ctl", "-D", str(data), "stop", "-m", "immediate"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _search_file(tmp_path: Path, n_trials: int) -> Path:
    p = tmp_path / "pg.yaml"
    p.write_text(
        f"""name: pg
base:
  base: debug
  moe: {{routed_experts: null, shared_experts: null, top_k: null, expert_hidden: null,
         paper: {{experts: 4, top_k: 1, m: 1, shared: 0}}}}
space:
  params:
    moe.balance.expert_alpha: {{float: {{low: 0.001, high: 0.1, log: true}}}}
  granularity: [1, 2, 4]
budget: {{train_flops: 1.0e+9}}
sampler: {{kind: random, seed: 0}}
n_trials: {n_trials}
"""
    )
    return p


def _cmd(spec: Path, url: str, study: str, run_dir: Path, seconds: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moeforge",
        "search",
        str(spec),
        "--storage",
        url,
        "--study",
        study,
        "--out",
        str(run_dir),
        "--no-plots",
        "--fake-objective",
        str(seconds),
    ]


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _study(url: str, name: str):
    import optuna
    from moeforge.search import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url))


def test_two_workers_share_a_study(pg_url, tmp_path):
    spec = _search_file(tmp_path, 8)
    r = subprocess.run(
        [*_cmd(spec, pg_url, "shared", tmp_path / "run", 0.3), "--workers", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from moeforge.search import counted
    from optuna.trial import TrialState

    trials = _study(pg_url, "shared").get_trials()
    numbers = [t.number for t in trials]
    assert numbers, r.stderr[-3000:]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1  # no duplicate or lost trial numbers
    real = counted(trials)
    assert len(real) == 8 and all(t.state == TrialState.COMPLETE for t in real)
    assert {t.user_attrs["worker"] for t in real} == {0, 1}  # both workers trained
    assert len({t.user_attrs["pid"] for t in real}) == 2


def test_killed_worker_trial_is_failed_and_retried(pg_url, tmp_path):
    from optuna.trial import TrialState

    spec = _search_file(tmp_path, 3)
    env = _env(MOEFORGE_SEARCH_HEARTBEAT_S="1")
    victim = subprocess.Popen(
        _cmd(spec, pg_url, "kill", tmp_path / "a", 30),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.5)
        with contextlib.suppress(KeyError):  # the study does not exist yet
            running = [t for t in _study(pg_url, "kill").get_trials() if t.state == TrialState.RUNNING]
    assert running, "the first worker never started a trial"
    time.sleep(1.0)  # mid-trial
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(2.5)  # past the grace period (2 x heartbeat)
    r = subprocess.run(
        _cmd(spec, pg_url, "kill", tmp_path / "b", 0.2), env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    trials = {t.number: t for t in _study(pg_url, "kill").get_trials()}
    dead = trials[running[0].number]
    assert dead.state == TrialState.FAIL and "fail_reason" not in dead.user_attrs
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    dump = [(t.number, t.state.name, t.system_attrs, t.user_attrs.get("pid")) for t in trials.values()]
    assert len(retries) == 1, dump
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == dead.params
    from moeforge.search import counted

    assert len(counted(list(trials.values()))) == 3
