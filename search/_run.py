"""Running a search: storage, study, the worker loop, and what one trial trains.

A worker loops: ask a trial, turn it into a spec (`trial_to_spec`), check it analytically and against
the data, and only then train it, once per seed, reporting to the pruner at equal fractions of the
trial's own budget.

Which trials count toward ``n_trials`` (across all workers): those that trained or are training and
are final, i.e. carry the user attr ``counted``, did not die with their worker and were not superseded
by a retry. Infeasible proposals (told PRUNED with their ``constraints``, so constraint-aware samplers
learn from them) and proposals that repeat an earlier or running spec (told that spec's result,
``reused_from``) cost nothing and do not count.

Failures are data: whatever a trial raises fails that trial (``fail_reason``, ``fail_kind``, the
traceback in its folder) and the search goes on. A spec that failed is trained again once more; one
that fails the same way twice (same exception type), or ``MAX_ATTEMPTS`` times in all, is not.

Dead workers: on RDB storage (PostgreSQL) every running trial records heartbeats, and any worker fails
stale trials before asking; `RetryHeartbeatStaleTrialCallback` queues them again (``MAX_ATTEMPTS`` in a
chain). On the default journal file (one machine) a trial records its host and pid, and a worker fails
and re-queues running trials of processes on this host that no longer exist. Ctrl-C does the same for
the interrupted trial at once. A worker never leaves while a counted trial still runs elsewhere: that
worker may be dead, and its retry needs someone to train it.

A retried trial resumes from its own checkpoint: the folder of a trial is keyed by its spec and seed
(``trials/<spec_key>/seed-<seed>``), not by trial number.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import random
import socket
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from moeforge.compiler import ModelSpec, account
from optuna.trial import FrozenTrial, TrialState

from ._space import (
    Infeasible,
    constraint_values,
    describe,
    grid_space,
    spec_key,
    suggest,
    trial_budget,
    trial_to_spec,
)
from ._spec import SearchSpec, hparams, train_config
from ._tracking import SearchTracking, trial_started

if TYPE_CHECKING:
    from moeforge.runtime import Corpus

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: Evaluate one spec at one seed: (spec, seed, budget_flops, out_dir, on_eval) -> the trainer's summary.
Evaluate = Callable[[ModelSpec, int, float, Path, Callable[[float, dict], None]], dict]

MAX_SKIPS = 200  # consecutive proposals that train nothing before the space counts as exhausted
MAX_ATTEMPTS = 3  # trainings of one spec (first try and retries, for failures and for dead workers)
POLL_S = 1.0  # how often a waiting worker looks at the study again
SETTLE_S = 0.5  # after claiming a spec, how long to wait before checking that nobody else claimed it
ORPHAN_S = 120.0  # a running trial without its worker's pid after this long lost its worker right after ask
HEARTBEAT_ENV = "MOEFORGE_SEARCH_HEARTBEAT_S"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TrialFailed(Exception):
    """A trial that cannot finish; evaluators raise it to give a clean one-line reason."""


class SearchStop(Exception):
    """A problem with the run itself (storage, a study of another search); one line for the user."""


# -------------------------------------------------------------------------------------------- storage
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
            with _stable():
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
def _stable() -> Iterator[None]:
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


def constraint_names(search: SearchSpec) -> list[str]:
    """Names of the trial constraints: ``valid_spec`` and ``fits_data`` first, then each limit set."""
    c = search.constraints
    limits = ("max_params_total", "max_params_activated", "max_forward_flops_per_token", "max_memory_bytes")
    return ["valid_spec", "fits_data", *(n for n in limits if getattr(c, n) is not None)]


def _constrain(trial: optuna.Trial, search: SearchSpec, values: list[float]) -> None:
    """Record constraint values through Optuna's constraint API (samplers read them) and as a user attr."""
    trial.set_user_attr("constraints", values)
    for name, value in zip(constraint_names(search), values, strict=True):
        trial.set_constraint(name, float(value))


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler calls study.stop() when the grid is used up, which only works inside
    study.optimize; the worker loop asks is_exhausted() itself."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass


def make_sampler(
    search: SearchSpec, worker: int = 0, concurrent: bool = False
) -> optuna.samplers.BaseSampler:
    """The search's sampler; worker i uses seed + i (grid: seed; a shared storage salts i per process).

    With concurrent workers TPE uses the constant liar, so running trials count as bad results and
    workers do not propose the same region at once."""
    s = search.sampler
    seed = s.seed + worker
    if s.kind == "grid":
        # Not seed + worker: the grid sampler shuffles its grid with the seed and trial k of the study
        # takes grid point k, so workers with different seeds would cover some points twice and miss others.
        return _GridSampler(grid_space(search), seed=s.seed)
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.kind == "nsga2":
        pop = min(50, max(4, search.n_trials // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=s.n_startup_trials, constant_liar=concurrent
    )


def make_pruner(search: SearchSpec) -> optuna.pruners.BasePruner:
    p = search.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search.train.eval_points)
    return optuna.pruners.NopPruner()


def _comparable(search: SearchSpec) -> dict:
    """What must agree for two runs to share a study: everything but the cap and the timeout, with the base
    compared as the validated spec (so `null`s or the form it was written in do not matter)."""
    out = search.model_dump(mode="json", exclude={"n_trials", "timeout_s"})
    with contextlib.suppress(Exception):  # an invalid base compares as written
        out["base"] = ModelSpec.model_validate(search.base).model_dump(mode="json")
    return out


def data_record(corpus: Corpus) -> dict[str, Any]:
    """What a study and each trial record about the data they train on."""
    return {
        "fingerprint": corpus.fingerprint,
        "name": corpus.name,
        "level": corpus.level,
        "train_tokens": len(corpus.train),
        "val_tokens": len(corpus.val),
    }


def open_study(
    search: SearchSpec,
    storage_url: str,
    study_name: str,
    worker: int = 0,
    *,
    corpus: Corpus | None = None,
    concurrent: bool = False,
) -> optuna.Study:
    """Create the study or join it; refuse a study that holds a different search or different data."""
    storage = open_storage(storage_url)
    concurrent = concurrent or is_rdb(storage_url)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=search.directions,
            sampler=make_sampler(search, worker, concurrent),
            pruner=make_pruner(search),
            load_if_exists=True,
        )
    except ValueError as e:
        raise SearchStop(f"study {study_name!r}: {e}") from None
    held = study.user_attrs.get("search")
    if held is None:
        study.set_user_attr("search", search.model_dump(mode="json"))
        names = [search.objective.metric] + (["params_total"] if search.objective.params_total else [])
        with _stable():  # what optuna-dashboard labels the objective by
            study.set_metric_names(names)
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


def stored_search(study: optuna.Study) -> SearchSpec:
    held = study.user_attrs.get("search")
    if held is None:
        raise SearchStop(
            f"study {study.study_name!r} was not made by moeforge search (no search spec stored)"
        )
    return SearchSpec.model_validate(held)


def load_search_corpus(search: SearchSpec) -> Corpus:
    """The search's corpus (`train.data`), loaded without a vocabulary so each spec is checked against it."""
    from moeforge.runtime import DataError, load_corpus

    try:
        return load_corpus(search.train.data)
    except DataError as e:
        raise SearchStop(f"train.data: {e}") from None


def data_problem(search: SearchSpec, spec: ModelSpec, corpus: Corpus) -> str | None:
    """Why `spec` cannot train on `corpus` (checked before anything is built), or None."""
    if spec.vocab_size < corpus.min_vocab_size:
        return (
            f"vocab_size {spec.vocab_size} is smaller than the data's token range "
            f"({corpus.min_vocab_size} ids, {corpus.level}-level {corpus.name})"
        )
    if len(corpus.val) < spec.seq_len + 1:
        return (
            f"seq_len {spec.seq_len} needs {spec.seq_len + 1} validation tokens; the data has "
            f"{len(corpus.val)}"
        )
    if len(corpus.train) < spec.seq_len + 1:
        return f"seq_len {spec.seq_len} needs {spec.seq_len + 1} training tokens; the data has {len(corpus.train)}"
    if search.objective.metric == "val_bits_per_byte" and corpus.bytes_per_token is None:
        return f"val_bits_per_byte needs bytes per token, unknown for {corpus.name}"
    return None


# --------------------------------------------------------------------------------------- counting
def _died(t: FrozenTrial) -> bool:
    """Failed because its worker went away (not because training raised)."""
    return t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") is None


def _superseded(t: FrozenTrial) -> bool:
    """Not the last word on its spec: its worker died, a retry follows it, or it never trained."""
    ua = t.user_attrs
    return _died(t) or bool(ua.get("retried") or ua.get("skipped"))


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count toward n_trials: they trained (or are training) and are the final attempt."""
    return [
        t
        for t in trials
        if t.user_attrs.get("counted") and t.state != TrialState.WAITING and not _superseded(t)
    ]


# --------------------------------------------------------------------------------------- evaluation
def real_evaluator(
    search: SearchSpec, corpus: Corpus, device: str | None = None, tracking: SearchTracking | None = None
) -> Evaluate:
    """Build each spec and train it with `moeforge.runtime.train` on the search's corpus (its curves also
    to `tracking`'s trackers, when given).

    A seed whose folder holds a finished run is not trained again (its summary is returned); one that
    holds a checkpoint resumes from it.
    """
    import dataclasses

    import torch
    from moeforge.compiler import build
    from moeforge.runtime import find_checkpoint, train

    dev = device or search.train.device
    if search.train.cpu_threads:
        torch.set_num_threads(search.train.cpu_threads)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"

    def evaluate(
        spec: ModelSpec, seed: int, budget: float, out_dir: Path, on_eval: Callable[[float, dict], None]
    ) -> dict:
        done = _finished_summary(out_dir, budget)
        if done is not None:
            for k in range(1, search.train.eval_points + 1):
                on_eval(k / search.train.eval_points, {"val_loss": done["final_val_loss"]})
            return done
        resume = find_checkpoint(out_dir / "checkpoint") is not None
        if not resume:  # a run that stopped before its first checkpoint starts over
            for name in ("summary.json", "metrics.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        if search.train.devices_per_trial > 1:
            return _group_evaluate(search, spec, seed, budget, dev, out_dir, resume, on_eval)
        model = None
        try:
            model = build(spec, device=dev, seed=seed)
            return train(
                model,
                seq_len=spec.seq_len,
                train_flops_per_token=account(spec).train_flops_per_token,
                corpus=dataclasses.replace(corpus, vocab_size=spec.vocab_size),
                cfg=train_config(
                    search, budget_flops=budget, seed=seed, device=dev, rule=rule_for(search, spec, budget)
                ),
                out_dir=out_dir,
                resume=resume,
                on_eval=on_eval,
                progress=False,
                extra_summary={"spec_name": spec.name},
                tracking=tracking.for_seed(seed) if tracking is not None else None,
            )
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return evaluate


def _group_evaluate(
    search: SearchSpec,
    spec: ModelSpec,
    seed: int,
    budget: float,
    device: str,
    out_dir: Path,
    resume: bool,
    on_eval: Callable[[float, dict], None],
) -> dict:
    """Train one seed as a torchrun group of `train.devices_per_trial` processes (`_group.py`); the
    evaluations are reported when the group has finished (so a pruner has nothing to act on: refused at
    load)."""
    import subprocess

    from moeforge.runtime import torchrun_args

    from ._group import job

    k = search.train.devices_per_trial
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "group_job.json"
    rule = rule_for(search, spec, budget)
    path.write_text(json.dumps(job(search, spec, seed, budget, device, out_dir, resume, rule)) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_args(k, "moeforge.search._group", str(path)),
    ]
    env = dict(os.environ)
    if search.train.cpu_threads:
        env["OMP_NUM_THREADS"] = str(search.train.cpu_threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        (out_dir / "group.log").write_text(proc.stdout + proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("W", "I", " "))]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise TrialFailed(f"{k}-process group failed: {why} (log: {out_dir / 'group.log'})")
    with contextlib.suppress(OSError, ValueError):  # the evaluations, for the log (no pruner with groups)
        for line in (out_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "eval" and rec.get("fraction", 0) > 0 and rec.get("val_loss") is not None:
                on_eval(float(rec["fraction"]), rec)
    return json.loads((out_dir / "summary.json").read_text())


def rule_for(search: SearchSpec, spec: ModelSpec, budget: float) -> dict[str, Any]:
    """`train.hparams` at this spec and budget (empty for fixed)."""
    tokens = int(budget // account(spec).train_flops_per_token)
    return hparams(search, budget, spec.seq_len, tokens)


def _finished_summary(out_dir: Path, budget: float) -> dict | None:
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    with contextlib.suppress(ValueError, OSError):
        s = json.loads(path.read_text())
        if s.get("status") == "completed" and s.get("budget_flops") == budget:
            return s
    return None


# -------------------------------------------------------------------------------------- worker loop
@dataclass
class WorkerOptions:
    run_dir: Path
    worker: int = 0
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    corpus: Corpus | None = None
    """The data every trial trains on: proposals it cannot serve are infeasible; trials record it."""
    poll_s: float = POLL_S
    settle_s: float = SETTLE_S
    _waiting_said: set = field(default_factory=set)


def _heartbeats(study: optuna.Study) -> bool:
    # Optuna has no public API for heartbeats outside study.optimize (which this ask/tell loop cannot
    # use: it checks constraints and dedups before training); these are the calls optimize makes.
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = study._storage
    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


class _Heartbeat:
    """Record heartbeats for a running trial in a thread (study.optimize does this; ask/tell does not)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self.enabled = _heartbeats(study)
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.stop = threading.Event()

    def __enter__(self) -> _Heartbeat:
        if self.enabled:
            storage: Any = self.storage
            interval = storage.get_heartbeat_interval() or 30
            storage.record_heartbeat(self.trial_id)

            def beat() -> None:
                while not self.stop.wait(interval):
                    with contextlib.suppress(Exception):  # a missed beat is retried next interval
                        storage.record_heartbeat(self.trial_id)

            self.thread = threading.Thread(target=beat, daemon=True)
            self.thread.start()
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


def reap_dead(study: optuna.Study) -> list[int]:
    """Fail and re-queue running trials whose worker is gone; returns their numbers.

    Also a running trial that never got its worker's host and pid (set right after ask) for ORPHAN_S:
    its worker died in that window, and neither a pid check nor a heartbeat would ever find it.
    """
    now = datetime.datetime.now()
    orphans = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if "pid" not in t.user_attrs
        and t.datetime_start is not None
        and (now - t.datetime_start).total_seconds() > ORPHAN_S
    ]
    out = [t.number for t in orphans if _fail_and_retry(study, t)]
    if _heartbeats(study):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with _stable():
            optuna.storages.fail_stale_trials(study)
        failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        return sorted(set(out) | (before & failed))
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or t.user_attrs.get("host") != host:
            continue
        if not _alive(pid) and _fail_and_retry(study, t):
            out.append(t.number)
    return out


def _fail_and_retry(study: optuna.Study, t: FrozenTrial | optuna.Trial) -> bool:
    """Fail a trial whose worker is gone (or was interrupted) and queue it again, up to MAX_ATTEMPTS."""
    try:
        study.tell(t.number, state=TrialState.FAIL)
    except Exception:  # noqa: BLE001 - someone else finished or failed it first
        return False
    history = [*t.user_attrs.get("retry_history", []), t.number]
    if len(history) < MAX_ATTEMPTS:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retry_history": history})
    return True


def _fresh_attrs(trial: optuna.Trial, opts: WorkerOptions) -> None:
    # A retry is queued with the attrs of the trial it retries (Optuna's stale-trial callback copies
    # them); the decisions of that attempt do not carry over.
    carried = trial.user_attrs
    for k in (
        "counted",
        "claim",
        "reused_from",
        "infeasible",
        "fail_reason",
        "fail_kind",
        "retried",
        "waiting_for",
    ):
        if k in carried:
            trial.set_user_attr(k, False if k in ("counted", "claim") else None)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("worker", opts.worker)


def run_worker(search: SearchSpec, study: optuna.Study, evaluate: Evaluate, opts: WorkerOptions) -> int:
    """Propose, check and train trials until the cap, the timeout, or an exhausted space; returns trials trained."""
    cap = search.n_trials
    deadline = time.monotonic() + search.timeout_s if search.timeout_s else math.inf
    prefix = f"[w{opts.worker}]"
    skips = trained = 0
    sampler = study.sampler
    while True:
        if time.monotonic() > deadline:
            opts.log(f"{prefix} timeout reached")
            break
        for n in reap_dead(study):
            opts.log(f"{prefix} trial {n}: its worker died; failed and queued again")
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        full = len(counted(trials)) >= cap
        exhausted = not waiting and (
            skips >= MAX_SKIPS
            or (isinstance(sampler, optuna.samplers.GridSampler) and not _grid_left(search, trials))
        )
        if full or exhausted:
            # Stay while a trial runs elsewhere: its worker may be dead, and then its retry needs us.
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
            if not running:
                if exhausted and not full:
                    opts.log(f"{prefix} the space is exhausted: no new feasible spec in the last proposals")
                break
            _say_once(opts, f"{prefix} waiting for running trials {running} before leaving")
            time.sleep(opts.poll_s)
            continue
        trial = study.ask()
        with _Heartbeat(study, trial):  # from the start, so a worker killed at any point is found stale
            try:
                outcome = _run_trial(search, study, trial, evaluate, opts)
            except KeyboardInterrupt:
                trial.set_user_attr("died", "interrupted")
                _fail_and_retry(study, trial)
                opts.log(f"{prefix} trial {trial.number}: interrupted; it runs again when the search resumes")
                raise
        if outcome == "trained":
            trained += 1
            skips = 0
            _log_best(study, prefix, opts.log)
            prune_checkpoints(study, search, opts.run_dir)
        elif outcome == "full":
            continue
        else:
            skips += 1
    return trained


def _grid_left(search: SearchSpec, trials: list[FrozenTrial]) -> bool:
    """Whether some grid point has not been started. Optuna's own `is_exhausted` counts running points
    as not done and proposes them again; here a running point is someone's, and a dead worker's point
    comes back as a queued retry."""
    grid = grid_space(search)
    names = list(grid)
    started = {
        tuple(t.params.get(n) for n in names)
        for t in trials
        if t.state != TrialState.WAITING and all(n in t.params for n in names)
    }
    return any(point not in started for point in itertools.product(*grid.values()))


def _say_once(opts: WorkerOptions, line: str) -> None:
    if line not in opts._waiting_said:
        opts._waiting_said.add(line)
        opts.log(line)


def _run_trial(
    search: SearchSpec, study: optuna.Study, trial: optuna.Trial, evaluate: Evaluate, opts: WorkerOptions
) -> str:
    """One asked trial to its end; returns "trained", "skipped" (told without training) or "full"."""
    prefix = f"[w{opts.worker}]"
    _fresh_attrs(trial, opts)
    params = suggest(trial, search)
    label = _params_label(params)
    n_cons = len(constraint_names(search))

    def infeasible(why: str, cons: list[float]) -> str:
        _constrain(trial, search, cons)
        trial.set_user_attr("infeasible", why)
        study.tell(trial, state=TrialState.PRUNED)
        opts.log(f"{prefix} trial {trial.number} ({label}): infeasible, {why}")
        return "skipped"

    # ---- analytic and data checks: nothing is built before these pass
    try:
        spec = trial_to_spec(search, params)
    except Infeasible as e:
        return infeasible(str(e), [1.0] + [0.0] * (n_cons - 1))
    for k, v in describe(spec).items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("spec", spec.model_dump(mode="json"))
    budget = trial_budget(search, params)
    trial.set_user_attr("budget_flops", budget)
    # The unit of work is a spec at a budget: on a ladder each budget has its own key (claims, folders).
    key = spec_key(spec) + (f"-C{budget:.6g}" if search.budget.ladder else "")
    trial.set_user_attr("spec_key", key)
    limits = constraint_values(search, spec)
    data_why = data_problem(search, spec, opts.corpus) if opts.corpus is not None else None
    cons = [0.0, 1.0 if data_why else 0.0, *limits]
    if data_why:
        return infeasible(f"does not fit the data: {data_why}", cons)
    if any(c > 0 for c in limits):
        return infeasible(_violations(search, limits), cons)
    _constrain(trial, search, cons)
    if opts.corpus is not None:
        trial.set_user_attr("data_fingerprint", opts.corpus.fingerprint)

    queued = {"sibling_of", "retry_of"} & set(trial.user_attrs)
    if search.budget.ladder and search.sampler.kind != "grid" and not queued:  # drawn by the sampler
        _enqueue_other_budgets(study, trial, params, search)

    # ---- one trainer per spec, across workers
    earlier = _claim(study, trial, key, opts)
    if earlier is not None:
        _reuse(study, trial, earlier)
        opts.log(
            f"{prefix} trial {trial.number} ({label}): same spec as trial {earlier.number}, result reused"
        )
        return "skipped"
    trial.set_user_attr("counted", True)
    if not _under_cap(study, trial, search.n_trials, opts):  # other workers filled the cap since we looked
        trial.set_user_attr("skipped", "n_trials reached by other workers")
        study.tell(trial, state=TrialState.FAIL)
        return "full"

    # ---- train, once per seed
    state, values = _train_trial(search, spec, trial, evaluate, opts, label)
    if state == TrialState.FAIL:
        _maybe_retry(study, trial, key, opts)
    study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
    return "trained"


def _enqueue_other_budgets(
    study: optuna.Study, trial: optuna.Trial, params: dict, search: SearchSpec
) -> None:
    """A proposal of a ladder search that the sampler drew (not a queued one) is queued at every other
    budget, so each architecture trains at every budget."""
    for c in search.budget.budgets:
        if c != params["budget"]:
            study.enqueue_trial({**params, "budget": c}, user_attrs={"sibling_of": trial.number})


def _under_cap(study: optuna.Study, trial: optuna.Trial, cap: int, opts: WorkerOptions) -> bool:
    """Whether this trial, just marked counted, may train without the study passing `cap`.

    Only earlier trials (lower numbers) are weighed: those counted, and those still running that may yet
    count (not yet decided, and not waiting on another trial's result). Of trials deciding at once the
    later ones wait for the earlier ones, so the cap holds however the workers interleave.
    """
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        done = len(counted(earlier))
        undecided = [
            t
            for t in earlier
            if t.state == TrialState.RUNNING
            and not t.user_attrs.get("counted")
            and t.user_attrs.get("waiting_for") is None
        ]
        if done >= cap:
            return False
        if done + len(undecided) < cap:
            return True
        time.sleep(opts.poll_s / 5)
        reap_dead(study)


def _same_key(study: optuna.Study, key: str, number: int) -> list[FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number != number
        and t.user_attrs.get("spec_key") == key
        and not t.user_attrs.get("infeasible")
        and t.user_attrs.get("reused_from") is None
    ]


def _claim(study: optuna.Study, trial: optuna.Trial, key: str, opts: WorkerOptions) -> FrozenTrial | None:
    """Decide who trains spec `key`: returns the finished trial whose result this one reuses (after
    waiting for a trial that trains it right now), or None when this trial trains it.

    A trial claims a spec (user attr ``claim``) after seeing no other claim, then looks again after
    `settle_s`; of two that claimed at once, the higher number yields. A claimant whose worker died is
    failed by `reap_dead` and stops counting, so the spec is claimed again.
    """
    prefix = f"[w{opts.worker}]"
    while True:
        others = _same_key(study, key, trial.number)
        done = [t for t in others if t.state in FINISHED and not _superseded(t)]
        if done:
            return min(done, key=lambda t: t.number)
        claims = [t for t in others if t.state == TrialState.RUNNING and t.user_attrs.get("claim")]
        if not claims:
            trial.set_user_attr("waiting_for", None)
            trial.set_user_attr("claim", True)
            if not any(
                t.state == TrialState.RUNNING
                for t in study.get_trials(deepcopy=False)
                if t.number != trial.number
            ):
                return None  # nobody else is running anything: no race to settle
            time.sleep(opts.settle_s)
            rivals = [
                t
                for t in _same_key(study, key, trial.number)
                if t.state == TrialState.RUNNING and t.user_attrs.get("claim") and t.number < trial.number
            ]
            if not rivals:
                return None
            trial.set_user_attr("claim", False)
            claims = rivals
        trial.set_user_attr("waiting_for", claims[0].number)  # not a candidate for the cap meanwhile
        _say_once(
            opts,
            f"{prefix} trial {trial.number}: same spec as running trial {claims[0].number}; waiting for it",
        )
        time.sleep(opts.poll_s)
        for n in reap_dead(study):
            opts.log(f"{prefix} trial {n}: its worker died; failed and queued again")


def _reuse(study: optuna.Study, trial: optuna.Trial, earlier: FrozenTrial) -> None:
    trial.set_user_attr("reused_from", earlier.number)
    for k in (
        "fail_reason",
        "fail_kind",
        "train_flops",
        "budget_flops",
        "tokens",
        "value_mean",
        "value_std",
        "seeds",
        "seed_values",
        "hparams",
    ):
        if k in earlier.user_attrs:
            trial.set_user_attr(k, earlier.user_attrs[k])
    if earlier.state == TrialState.COMPLETE:
        study.tell(trial, earlier.values)
    else:
        study.tell(trial, state=earlier.state)


def _maybe_retry(study: optuna.Study, trial: optuna.Trial, key: str, opts: WorkerOptions) -> None:
    """Queue a failed trial again unless its spec failed the same way before or ran out of attempts."""
    kind = trial.user_attrs.get("fail_kind")
    before = [t for t in _same_key(study, key, trial.number) if t.state == TrialState.FAIL and not _died(t)]
    prefix = f"[w{opts.worker}]"
    if any(t.user_attrs.get("fail_kind") == kind for t in before):
        opts.log(f"{prefix} trial {trial.number}: failed the same way twice ({kind}); not retried")
        return
    if len(before) + 1 >= MAX_ATTEMPTS:
        opts.log(f"{prefix} trial {trial.number}: {MAX_ATTEMPTS} failed attempts; not retried")
        return
    trial.set_user_attr("retried", True)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    opts.log(f"{prefix} trial {trial.number}: queued again (a second failure of the same kind is final)")


def prune_checkpoints(study: optuna.Study, search: SearchSpec, run_dir: Path) -> list[Path]:
    """Delete the checkpoints of finished trials that `train.keep_checkpoints` does not keep; returns them.

    A spec whose folder a running, queued or retried trial still needs is left alone, as is everything
    outside this run dir's own trial folders (summaries and metrics always stay).
    """
    import shutil

    policy = search.train.keep_checkpoints
    if policy == "all":
        return []
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    keep = {best.user_attrs.get("spec_key")} if best is not None and policy == "best" else set()
    keep |= {
        t.user_attrs.get("spec_key")
        for t in trials
        if t.state in (TrialState.RUNNING, TrialState.WAITING) or t.user_attrs.get("retried")
    }
    finished: set[str] = {
        t.user_attrs["spec_key"] for t in trials if t.state in FINISHED and "spec_key" in t.user_attrs
    }
    finished -= keep
    removed = []
    for key in sorted(finished):
        for ckpt in sorted(trial_dir(run_dir, key).glob("seed-*/checkpoint*")):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    return removed


def trial_dir(run_dir: Path, key: str) -> Path:
    """A spec's folder in the run dir: one sub-folder per seed, shared by every attempt at that spec."""
    return run_dir / "trials" / key


def _train_trial(
    search: SearchSpec,
    spec: ModelSpec,
    trial: optuna.Trial,
    evaluate: Evaluate,
    opts: WorkerOptions,
    label: str,
) -> tuple[TrialState, list[float] | None]:
    prefix = f"[w{opts.worker}]"
    metric = search.objective.metric
    budget = trial_budget(search, trial.params)
    prune = search.pruner.kind != "none"
    eval_points = search.train.eval_points
    values: list[float] = []
    summaries: list[dict] = []
    folder = trial_dir(opts.run_dir, trial.user_attrs["spec_key"])
    trial.set_user_attr("trial_dir", str(folder.relative_to(opts.run_dir)))
    trial_started(trial.number, trial.params)  # names the trackers' runs (search --log)
    for i, seed in enumerate(search.seeds):
        out_dir = folder / f"seed-{seed}"

        def on_eval(fraction: float, metrics: dict, seed: int = seed, first: bool = i == 0) -> None:
            value = metrics.get(metric, metrics.get("val_loss"))
            opts.log(
                f"{prefix} trial {trial.number} ({label}) seed {seed}: {fraction:4.0%} of budget, {metric} {value:.4f}"
            )
            if first and prune and value is not None:
                trial.report(float(value), step=max(1, round(fraction * eval_points)))
                if trial.should_prune():
                    raise optuna.TrialPruned()

        try:
            summary = evaluate(spec, seed, budget, out_dir, on_eval)
        except optuna.TrialPruned:
            opts.log(f"{prefix} trial {trial.number} ({label}): pruned")
            return TrialState.PRUNED, None
        except Exception as e:  # noqa: BLE001 - any failure of one trial is data, not a crash
            reason = _one_line(e)
            folder.mkdir(parents=True, exist_ok=True)
            tb = folder / f"trial-{trial.number}.traceback.txt"
            tb.write_text(f"trial {trial.number} seed {seed} ({label})\n{traceback.format_exc()}")
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_kind", type(e).__name__)
            trial.set_user_attr("traceback", str(tb.relative_to(opts.run_dir)))
            opts.log(f"{prefix} trial {trial.number} ({label}): FAILED, {reason} (traceback: {tb})")
            return TrialState.FAIL, None
        value = summary.get("final_val_loss") if metric == "val_loss" else summary.get("val_bits_per_byte")
        if value is None or not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"no finite {metric} in the trainer's summary")
            trial.set_user_attr("fail_kind", "NoMetric")
            return TrialState.FAIL, None
        values.append(float(value))
        summaries.append(summary)
    s0 = summaries[0]
    for k in (
        "train_flops",
        "budget_flops",
        "tokens",
        "initial_val_loss",
        "final_val_loss",
        "val_bits_per_byte",
        "tokens_per_second",
    ):
        if k in s0:
            trial.set_user_attr(k, s0[k])
    load = s0.get("load")
    if load is not None:
        trial.set_user_attr("load", json.loads(json.dumps(load, default=float)))
    cfg = train_config(
        search, budget_flops=budget, seed=search.seeds[0], device="cpu", rule=rule_for(search, spec, budget)
    )
    trial.set_user_attr("hparams", {"rule": search.train.hparams, "lr": cfg.lr, "batch_size": cfg.batch_size})
    trial.set_user_attr("seeds", list(search.seeds))
    trial.set_user_attr("seed_values", values)
    if len(values) > 1:
        trial.set_user_attr("value_std", statistics.stdev(values))
        trial.set_user_attr("train_flops_all", [s.get("train_flops") for s in summaries])
    mean = statistics.fmean(values)
    trial.set_user_attr("value_mean", mean)
    out = [mean]
    if search.objective.params_total:
        out.append(float(account(spec).params_total))
    opts.log(f"{prefix} trial {trial.number} ({label}): done, {metric} {mean:.4f}")
    return TrialState.COMPLETE, out


def _one_line(e: BaseException) -> str:
    """A failure as one line: the evaluator's own words for TrialFailed, else the type and first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, TrialFailed):
        return text or "failed"
    names = {"Diverged": "diverged", "OutOfMemory": "out of memory", "OutOfMemoryError": "out of memory"}
    kind = names.get(type(e).__name__, type(e).__name__)
    return f"{kind}: {text}" if text else kind


def _violations(search: SearchSpec, limits: list[float]) -> str:
    names = constraint_names(search)[2:]
    return ", ".join(f"{n} exceeded by {v:.1%}" for n, v in zip(names, limits, strict=True) if v > 0)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The lowest-loss complete trial that trained itself (reused results point at their original); on a
    budget ladder, of the largest budget that has one (losses of different budgets do not compare)."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("reused_from") is None
    ]
    if not done:
        return None
    top = max(t.params.get("budget", 0.0) for t in done)
    return min((t for t in done if t.params.get("budget", 0.0) == top), key=lambda t: t.values[0])


def _log_best(study: optuna.Study, prefix: str, log: Callable[[str], None]) -> None:
    b = best_trial(study)
    if b is not None:
        log(f"{prefix} best so far: trial {b.number}, value {b.values[0]:.4f} ({_params_label(b.params)})")


def _params_label(params: dict) -> str:
    """``m=2, size=0.5, budget=1.5e+11``: floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
