"""Worker processes share one study on a real PostgreSQL server: workers that start at the same moment
on a fresh database all come up, and a worker SIGKILLed mid-trial has its trial failed by the default
heartbeat and retried by the workers that remain, so the study ends with exactly the trials asked for.

The server runs on 127.0.0.1 in a temp dir, as an unprivileged user when the tests run as root
(initdb and pg_ctl refuse root), and is stopped with `pg_ctl stop -m immediate` at the end.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from fakes import command

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


def _fresh_db(url: str, name: str) -> str:
    """A new, empty database on the test server (Optuna creates its schema on first use)."""
    host_port = url.split("@", 1)[1].rsplit("/", 1)[0]
    host, port = host_port.split(":")
    subprocess.run(
        ["createdb", "-h", host, "-p", port, "-U", "postgres", name], check=True, capture_output=True
    )
    return f"postgresql://postgres@{host_port}/{name}"


def _study(url: str, name: str = "pg"):
    import optuna
    from moeforge.search import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url))


def _start(spec: Path, url: str, out: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        command(spec, out, seconds, storage=url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_workers_started_together_on_a_fresh_database_share_a_study(pg_url, tmp_path):
    url = _fresh_db(pg_url, "together")
    spec = _search_file(tmp_path, 8)
    procs = [_start(spec, url, tmp_path / f"run{i}", 0.3) for i in range(3)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for e in errs]
    assert not any("Traceback" in e for e in errs)
    from moeforge.search import counted
    from optuna.trial import TrialState

    trials = _study(url).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1  # no duplicate or lost trial numbers
    real = counted(trials)
    assert len(real) == 8 and all(t.state == TrialState.COMPLETE for t in real)
    assert len({t.user_attrs["pid"] for t in real}) >= 2  # the workers shared the work
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_killed_worker_is_waited_for_failed_and_retried_with_the_default_heartbeat(pg_url, tmp_path):
    """The issue's run: two workers start together on a fresh database, n_trials 6, one is SIGKILLed
    mid-trial and started again. The search must not end while the dead worker's trial waits for its
    heartbeat to go stale (30 s interval, 60 s grace): the others wait, fail it, and retry it."""
    from moeforge.search import counted
    from optuna.trial import TrialState

    url = _fresh_db(pg_url, "killed")
    spec = _search_file(tmp_path, 6)
    victim = _start(spec, url, tmp_path / "a", 4.0)
    other = _start(spec, url, tmp_path / "b", 4.0)
    deadline = time.time() + 90
    mine = []
    while time.time() < deadline and not mine:
        time.sleep(0.5)
        with contextlib.suppress(Exception):  # the study may not exist yet
            mine = [
                t
                for t in _study(url).get_trials()
                if t.state == TrialState.RUNNING
                and t.user_attrs.get("pid") == victim.pid
                and t.user_attrs.get("counted")
            ]
    assert mine, "the first worker never started a trial"
    time.sleep(1.0)  # mid-trial
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    again = _start(spec, url, tmp_path / "c", 4.0)
    errs = [p.communicate(timeout=400)[1] for p in (other, again)]
    assert [other.returncode, again.returncode] == [0, 0], [e[-2000:] for e in errs]
    trials = {t.number: t for t in _study(url).get_trials()}
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    real = counted(list(trials.values()))
    assert len(real) == 6 and all(t.state == TrialState.COMPLETE for t in real)
    dead = trials[mine[0].number]
    assert dead.state == TrialState.FAIL and dead.user_attrs.get("fail_reason") is None
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == dead.params
    assert any("waiting for running trials" in e for e in errs)
