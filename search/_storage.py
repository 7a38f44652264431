"""Where a study lives: a journal file on one machine, or an RDB (PostgreSQL) shared by machines, whose
workers record heartbeats so that a dead worker's trial is found and retried."""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna

from ._errors import SearchStop
from ._trials import MAX_ATTEMPTS

HEARTBEAT_ENV = "MOEFORGE_SEARCH_HEARTBEAT_S"


def default_storage(run_dir: Path) -> str:
    return str(run_dir / "study.journal")


def is_rdb(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql", "sqlite")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A journal file (a path) for one machine, or an RDB URL (``postgresql://...``) with heartbeats.

    Workers that start at the same moment on a fresh database race in Optuna's schema creation (one
    gets a unique violation on PostgreSQL's type catalog); the loser retries after a random pause.
    """
    if not is_rdb(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        url = f"postgresql+psycopg://{rest}"  # psycopg 3 under SQLAlchemy 2
    interval = int(os.environ.get(HEARTBEAT_ENV, "30"))
    for attempt in range(8):
        try:
            with stable():
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={} if scheme.startswith("sqlite") else {"pool_pre_ping": True},
                    heartbeat_interval=interval,
                    grace_period=2 * interval,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_ATTEMPTS - 1
                    ),
                )
        except Exception as e:  # noqa: BLE001 - connection errors come in many types
            if _schema_race(e) and attempt < 7:
                time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
                continue
            raise SearchStop(f"cannot open storage {redact(url)}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def stable() -> Iterator[None]:
    """Optuna marks heartbeats, stale-trial failing and metric names experimental (all there since 2.9 or
    3.2, and what a shared search needs); the warning says nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _schema_race(e: Exception) -> bool:
    """Another process is creating the same tables right now (IntegrityError / duplicate object)."""
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in ("IntegrityError", "UniqueViolation", "already exists", "DuplicateTable"))


def redact(url: str) -> str:
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url
