"""The search command's engine: open the study, run workers (here or as processes), write the results."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from moeforge.runtime import python_module_cmd

from ._data import load_search_corpus
from ._errors import SearchStop
from ._evaluate import Evaluate, real_evaluator
from ._progress import SearchProgress
from ._records import TrialRecord, trial_records
from ._results import write_results
from ._space import check_budgets
from ._spec import SearchSpec
from ._storage import default_storage, is_rdb, open_storage, redact
from ._study import load_study, open_study, run_dir_storage, stored_search
from ._summary import SearchResult
from ._tracking import SearchTracking
from ._trials import best_trial, counted
from ._worker import WorkerOptions, run_worker


@dataclass
class RunConfig:
    """Where and how a search runs (the command line's options)."""

    run_dir: Path
    storage: str | None = None
    study: str | None = None
    workers: int | None = None
    """Worker processes on this machine; None (``--workers auto``) picks `auto_workers`."""
    device: str | None = None
    plots: bool = True
    log: tuple[str, ...] = ()
    """Trackers every trial's curves also go to (``--log``: tensorboard, wandb, mlflow)."""
    progress: bool = False
    """Show the live display (trials, failures, best so far, time) on the terminal."""


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def auto_workers(search: SearchSpec, device: str | None = None) -> int:
    """One worker per `train.devices_per_trial` visible GPUs on CUDA; on CPU, the cores divided by each
    trial's torch threads times its processes (one worker when `train.cpu_threads` is unset, since torch
    then uses every core); never more workers than trials."""
    dev = device or search.train.device
    gpus = _gpus() if dev in ("auto", "cuda") else []
    k = search.train.devices_per_trial
    if gpus:
        n = max(1, len(gpus) // k)
    elif search.train.cpu_threads:
        n = max(1, (os.cpu_count() or 1) // (search.train.cpu_threads * k))
    else:
        n = 1
    return max(1, min(n, search.n_trials))


def process_salt() -> int:
    """A number that differs between processes and machines, added to a shared study's sampler seed."""
    return int.from_bytes(
        hashlib.sha256(f"{socket.gethostname()}:{os.getpid()}".encode()).digest()[:3], "big"
    )


def run_search(
    search: SearchSpec,
    cfg: RunConfig,
    evaluate: Evaluate | None = None,
    log: Callable[[str], None] = _log,
) -> SearchResult:
    """Run (or resume) a search to its trial cap and write its results into the run dir.

    Args:
        search: a loaded search spec (`load_search`).
        cfg: run dir, storage URL (default a journal file in the run dir), study name (default the search
            name), worker processes (default `auto_workers`).
        evaluate: trains one spec at one seed; default the real trainer. Given, the search runs in this
            process (one worker), so tests and notebooks can pass their own.

    Returns:
        The `SearchResult` of `write_results` plus the storage, study name, run dir and worker count.

    Raises:
        SearchStop: the storage, the study or the data cannot be used (one line for the user).
        BudgetTooSmall: every candidate trains too few steps at its budget (a ValueError).
    """
    check_budgets(search)  # every candidate below the budget floor: stop before anything is made
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    url = cfg.storage or default_storage(run_dir)
    name = cfg.study or search.name
    workers = 1 if evaluate is not None else (cfg.workers or auto_workers(search, cfg.device))
    corpus = load_search_corpus(search)
    # A storage given by URL or path is meant to be shared: salt the sampler seed per process, or every
    # machine running this same command would propose the same specs in the same order.
    salt = process_salt() if cfg.storage else 0
    storage = open_storage(url)
    study = open_study(search, url, name, salt, corpus=corpus, concurrent=workers > 1, storage=storage)
    # The default journal is stored relative to the run dir, so a moved run dir still reports.
    stored = "study.journal" if cfg.storage is None else (url if is_rdb(url) else str(Path(url).resolve()))
    run_info = {"storage": redact(stored), "study": name, "search": search.name}
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    done_before = len(counted(study.get_trials(deepcopy=False)))
    log(
        f"search {search.name!r}: study {name!r} in {redact(url)}; {done_before}/{search.n_trials} trials done, "
        f"{search.budget.label()} training FLOPs each, {workers} worker{'s' * (workers > 1)}; "
        f"data {corpus.name} ({len(corpus.train):,} train + {len(corpus.val):,} val tokens, "
        f"fingerprint {corpus.fingerprint})"
    )
    interrupted = False
    worker_errors: list[int] = []
    tracking = SearchTracking(cfg.log, run_dir, name)
    if cfg.log and search.train.devices_per_trial > 1:
        log(f"--log {' '.join(cfg.log)}: not yet for trials on several devices; metrics.jsonl has the curves")
    display = SearchProgress(search, done_before, cfg.progress, log)
    try:
        with display:
            display.update(study)
            if workers <= 1:
                evaluate = evaluate or real_evaluator(search, corpus, cfg.device, tracking)

                def shown(line: str) -> None:
                    display.log(line)
                    display.update(study)

                run_worker(search, study, evaluate, WorkerOptions(run_dir, 0, shown, corpus, storage=storage))
            else:
                worker_errors = _run_processes(search, study, url, name, workers, cfg, display)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        write_results(study, search, run_dir, plots=cfg.plots)  # what finished is never lost
        raise
    summary = replace(
        write_results(study, search, run_dir, plots=cfg.plots),
        storage=redact(url),
        study=name,
        run_dir=str(run_dir),
        workers=workers,
        interrupted=interrupted,
        worker_errors=worker_errors,
    )
    if interrupted:
        raise KeyboardInterrupt
    return summary


def run_one_worker(run_dir: Path, storage: str, study_name: str, worker: int, cfg: RunConfig) -> int:
    """The hidden ``--worker`` entry point: join the study and work until the cap."""
    st = storage_for(storage)
    try:
        probe = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        raise SearchStop(f"no study {study_name!r} in {redact(storage)}") from None
    search = stored_search(probe)
    corpus = load_search_corpus(search)
    study = open_study(
        search, storage, study_name, worker + process_salt(), corpus=corpus, concurrent=True, storage=st
    )
    evaluate = real_evaluator(search, corpus, cfg.device, SearchTracking(cfg.log, run_dir, study_name))
    return run_worker(search, study, evaluate, WorkerOptions(run_dir, worker, _log, corpus, storage=st))


def storage_for(url: str) -> optuna.storages.BaseStorage:
    return open_storage(url)


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [v for v in visible.split(",") if v.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _run_processes(
    search: SearchSpec,
    study: optuna.Study,
    url: str,
    name: str,
    workers: int,
    cfg: RunConfig,
    display: SearchProgress,
) -> list[int]:
    """N worker processes of this same command; one GPU each when there are GPUs; poll for the best.

    With the live display on, the workers' log lines come through a pipe and print above it."""
    log = display.log
    gpus = _gpus() if (cfg.device or search.train.device) in ("auto", "cuda") else []
    procs, pumps = [], []
    for i in range(workers):
        cmd = python_module_cmd("moeforge", "search", "--worker", str(i), "--out", str(cfg.run_dir))
        cmd += ["--storage", url, "--study", name]
        if cfg.device:
            cmd += ["--device", cfg.device]
        for kind in cfg.log:
            cmd += ["--log", kind]
        env = dict(os.environ)
        if gpus:  # worker i gets its own group of devices_per_trial GPUs
            k = search.train.devices_per_trial
            group = [gpus[(i * k + j) % len(gpus)] for j in range(k)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        piped = display.enabled
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE if piped else None, text=piped))
        if procs[-1].stderr is not None:
            pumps.append(display.forward(procs[-1].stderr))
    last = None
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(3)
            display.update(study)
            best = best_trial(study)
            if best is not None and best.number != last:
                last = best.number
                n = len(counted(study.get_trials(deepcopy=False)))
                log(
                    f"best so far: trial {best.number}, {search.objective.metric} {best.values[0]:.4f} ({n}/{search.n_trials} trials)"
                )
    except KeyboardInterrupt:
        for p in procs:
            try:
                p.wait(timeout=30)  # Ctrl-C reached the workers too; let them record their trials
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    for t in pumps:  # the workers' last lines
        t.join(timeout=5)
    bad = [p.returncode for p in procs if p.returncode not in (0, None)]
    if bad:
        log(f"{len(bad)} worker(s) exited with status {bad}; finished trials are kept, rerun to resume")
    return bad


def report(
    run_dir: Path | None, storage: str | None, study_name: str | None, plots: bool = True
) -> tuple[SearchSpec, list[TrialRecord]]:
    """Load a search's study (from a run dir's run.json, or a storage URL) and rewrite its results."""
    if storage is None:
        if run_dir is None:
            raise FileNotFoundError("give a RUN_DIR or --storage URL")
        if not (run_dir / "run.json").is_file():
            raise FileNotFoundError(f"{run_dir}: not a search run dir (no run.json)")
        storage, stored_name = run_dir_storage(run_dir)
        study_name = study_name or stored_name
        if "***" in storage:
            raise FileNotFoundError(
                f"{run_dir}: the storage URL's password is not stored; give --storage URL"
            )
    study = load_study(storage, study_name)
    search = stored_search(study)
    if run_dir is not None:
        write_results(study, search, run_dir, plots=plots)
    return search, trial_records(study)
