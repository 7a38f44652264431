"""Loading a search's study: from a run dir's run.json or a storage URL to its search spec and trial records.

Below both users: the report (`_driver.report`, which also rewrites the run dir's results) and the scaling
fit (`_scaling.runs.load_runs`, which only reads them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from ._records import trial_records
from ._run import is_rdb, open_storage, redact, stored_search
from ._spec import SearchSpec


def run_dir_storage(run_dir: Path) -> tuple[str, str]:
    """The storage URL and study name that a run dir's run.json names; a journal file stored relative to
    the run dir (the default) comes back as a path under `run_dir`, so a moved run dir still loads."""
    info = json.loads((run_dir / "run.json").read_text())
    storage = info["storage"]
    if not is_rdb(storage) and not Path(storage).is_absolute():
        storage = str(run_dir / storage)
    return storage, info["study"]


def load_study(storage: str, study_name: str | None) -> optuna.Study:
    """The study `study_name` in `storage` (a URL or a journal file); None picks the storage's only study.

    Raises:
        FileNotFoundError: no such study, or several to choose from (the message says which).
    """
    st = open_storage(storage)
    if study_name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        if len(names) != 1:
            raise FileNotFoundError(f"{redact(storage)} holds studies {names}; give --study NAME")
        study_name = names[0]
    try:
        return optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        raise FileNotFoundError(f"no study {study_name!r} in {redact(storage)}") from None


def read_study(run_dir: Path) -> tuple[SearchSpec, list[dict[str, Any]]]:
    """A run dir's search spec and trial records, read from its study; nothing in the run dir is written."""
    storage, name = run_dir_storage(run_dir)
    study = load_study(storage, name)
    return stored_search(study), trial_records(study)
