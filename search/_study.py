"""A search's study: created with its search spec and data recorded, joined by a worker whose search and
data agree with what it holds, or loaded back from a run dir.

Loading sits below both of its users: the report (`_driver.report`, which also rewrites the run dir's
results) and the scaling fit (`_scaling.runs.load_runs`, which only reads them).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from moeforge.compiler import ModelSpec

from ._data import data_record
from ._errors import SearchStop
from ._records import TrialRecord, trial_records
from ._samplers import make_pruner, make_sampler
from ._spec import SearchSpec
from ._storage import is_rdb, open_storage, redact, stable

if TYPE_CHECKING:
    from moeforge.runtime import Corpus

SETUP_S = 30.0  # how long a joining worker waits for the study's creator to record its search spec


def _comparable(search: SearchSpec) -> dict:
    """What must agree for two runs to share a study: everything but the cap and the timeout, with the base
    compared as the validated spec (so `null`s or the form it was written in do not matter)."""
    out = search.model_dump(mode="json", exclude={"n_trials", "timeout_s"})
    with contextlib.suppress(Exception):  # an invalid base compares as written
        out["base"] = ModelSpec.model_validate(search.base).model_dump(mode="json")
    return out


def open_study(
    search: SearchSpec,
    storage_url: str,
    study_name: str,
    worker: int = 0,
    *,
    corpus: Corpus | None = None,
    concurrent: bool = False,
    storage: optuna.storages.BaseStorage | None = None,
) -> optuna.Study:
    """Create the study or join it; refuse a study that holds a different search or different data.

    Creating a study is atomic in every Optuna storage (one of two workers creating the same name gets
    `DuplicatedStudyError`), so only the creator records the search spec and the data; a worker that
    joins waits for them and compares. Two workers with different searches starting at the same moment
    cannot both pass the check.

    Args:
        storage: the storage of `storage_url` if the caller opened it already (`open_storage`).
    """
    storage = storage if storage is not None else open_storage(storage_url)
    concurrent = concurrent or is_rdb(storage_url)

    def create(load_if_exists: bool) -> optuna.Study:
        return optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=search.directions,
            sampler=make_sampler(search, worker, concurrent),
            pruner=make_pruner(search),
            load_if_exists=load_if_exists,
        )

    try:
        try:
            study, created = create(False), True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = create(True), False
    except ValueError as e:
        raise SearchStop(f"study {study_name!r}: {e}") from None
    if created:
        if corpus is not None:
            study.set_user_attr("data", data_record(corpus))
        _record_search(study, search)  # last: a joining worker waits for it
        return study
    held = _wait_for_search(study)
    if held is None:  # a study without a search spec (made by Optuna itself): this search takes it
        _record_search(study, search)
    elif _comparable(SearchSpec.model_validate(held)) != _comparable(search):
        raise SearchStop(
            f"study {study_name!r} in {redact(storage_url)} holds a different search; "
            "use another --study or --out, or the same search spec and budget"
        )
    if corpus is not None:
        mine = data_record(corpus)
        data = study.user_attrs.get("data")
        if data is None:
            study.set_user_attr("data", mine)
        elif data["fingerprint"] != mine["fingerprint"]:
            raise SearchStop(
                f"study {study_name!r} trains on data with fingerprint {data['fingerprint']} ({data['name']}, "
                f"{data['train_tokens']:,} + {data['val_tokens']:,} tokens); this machine's data has "
                f"{mine['fingerprint']} ({mine['name']}, {mine['train_tokens']:,} + {mine['val_tokens']:,} "
                "tokens): results would not be comparable; give every worker the same data"
            )
    return study


def _record_search(study: optuna.Study, search: SearchSpec) -> None:
    names = [search.objective.metric] + (["params_total"] if search.objective.params_total else [])
    with stable():  # what optuna-dashboard labels the objective by
        study.set_metric_names(names)
    study.set_user_attr("search", search.model_dump(mode="json"))


def _wait_for_search(study: optuna.Study) -> dict | None:
    """The search spec a joined study holds, waiting up to SETUP_S for a creator that is recording it."""
    deadline = time.monotonic() + SETUP_S
    while True:
        held = study.user_attrs.get("search")
        if held is not None or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def stored_search(study: optuna.Study) -> SearchSpec:
    """The search spec the study holds (recorded by its creator)."""
    held = study.user_attrs.get("search")
    if held is None:
        raise SearchStop(
            f"study {study.study_name!r} was not made by moeforge search (no search spec stored)"
        )
    return SearchSpec.model_validate(held)


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


def read_study(run_dir: Path) -> tuple[SearchSpec, list[TrialRecord]]:
    """A run dir's search spec and trial records, read from its study; nothing in the run dir is written."""
    storage, name = run_dir_storage(run_dir)
    study = load_study(storage, name)
    return stored_search(study), trial_records(study)
