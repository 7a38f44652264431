"""Finding trials whose worker is gone, failing them and queueing them again.

On RDB storage (PostgreSQL) every running trial records heartbeats, and any worker fails stale trials
before asking; `RetryHeartbeatStaleTrialCallback` queues them again (``MAX_ATTEMPTS`` in a chain). On the
default journal file (one machine) a trial records its host and pid, and a worker fails and re-queues
running trials of processes on this host that no longer exist. Ctrl-C does the same for the interrupted
trial at once. A retry keeps its trial's ``spec_key`` and the failed trial is marked ``retried``, so the
spec's checkpoints stay for the retry to resume from.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._storage import stable
from ._trials import MAX_ATTEMPTS

ORPHAN_S = 120.0  # a running trial without its worker's pid after this long lost its worker right after ask


def heartbeats(storage: optuna.storages.BaseStorage | None) -> bool:
    """Whether `storage` records heartbeats (an RDB storage that `open_storage` opened)."""
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def _trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> int:
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


class Heartbeat:
    """Record heartbeats for a running trial in a thread (study.optimize does this; ask/tell does not:
    this ask/tell loop checks constraints and dedups before training, so it cannot use optimize)."""

    def __init__(self, storage: optuna.storages.BaseStorage | None, study: optuna.Study, trial: optuna.Trial):
        self.storage = storage if heartbeats(storage) else None
        self.study, self.number = study, trial.number
        self.stop = threading.Event()

    def __enter__(self) -> Heartbeat:
        storage = self.storage
        if isinstance(storage, optuna.storages.RDBStorage):
            interval = storage.get_heartbeat_interval() or 30
            trial_id = _trial_id(storage, self.study, self.number)
            storage.record_heartbeat(trial_id)

            def beat() -> None:
                while not self.stop.wait(interval):
                    with contextlib.suppress(Exception):  # a missed beat is retried next interval
                        storage.record_heartbeat(trial_id)

            threading.Thread(target=beat, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead(study: optuna.Study, storage: optuna.storages.BaseStorage | None = None) -> list[int]:
    """Fail and re-queue running trials whose worker is gone; returns their numbers.

    Also a running trial that never got its worker's host and pid (set right after ask) for ORPHAN_S:
    its worker died in that window, and neither a pid check nor a heartbeat would ever find it.

    Args:
        study: the study.
        storage: the study's storage as `open_storage` built it: heartbeats where it records them, and
            the failed trial marked ``retried``; None (an in-memory study) checks pids only.
    """
    now = datetime.datetime.now()
    orphans = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if "pid" not in t.user_attrs
        and t.datetime_start is not None
        and (now - t.datetime_start).total_seconds() > ORPHAN_S
    ]
    out = [t.number for t in orphans if fail_and_retry(study, t, storage)]
    if heartbeats(storage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with stable():
            optuna.storages.fail_stale_trials(study)
        failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        return sorted(set(out) | (before & failed))
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or t.user_attrs.get("host") != host:
            continue
        if not _alive(pid) and fail_and_retry(study, t, storage):
            out.append(t.number)
    return out


def fail_and_retry(
    study: optuna.Study,
    t: FrozenTrial | optuna.Trial,
    storage: optuna.storages.BaseStorage | None = None,
) -> bool:
    """Fail a trial whose worker is gone (or was interrupted) and queue it again, up to MAX_ATTEMPTS.

    The retry carries the trial's ``spec_key`` and the trial is marked ``retried`` before it fails, so
    checkpoint pruning never sees the spec without a trial that still needs its folder.
    """
    history = [*t.user_attrs.get("retry_history", []), t.number]
    again = len(history) < MAX_ATTEMPTS
    if again:
        with contextlib.suppress(Exception):  # someone else finished or failed it first: tell says so
            if isinstance(t, optuna.Trial):
                t.set_user_attr("retried", True)
            elif storage is not None:
                storage.set_trial_user_attr(_trial_id(storage, study, t.number), "retried", True)
    try:
        study.tell(t.number, state=TrialState.FAIL)
    except Exception:  # noqa: BLE001 - someone else finished or failed it first
        return False
    if again:
        attrs = {"retry_of": t.number, "retry_history": history}
        if "spec_key" in t.user_attrs:
            attrs["spec_key"] = t.user_attrs["spec_key"]
        study.enqueue_trial(t.params, user_attrs=attrs)
    return True
