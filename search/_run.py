"""Running a search: storage, study, the worker loop, and what one trial trains.

A worker loops: ask a trial, turn it into a spec (`trial_to_spec`), check it analytically, and only then
train it, once per seed, reporting to the pruner at equal fractions of the trial's own budget.

Which trials count toward ``n_trials`` (across all workers): those that trained or are training, i.e.
carry the user attr ``counted`` and did not die with their worker. Infeasible proposals (told PRUNED with
their ``constraints``, so constraint-aware samplers learn from them) and proposals that repeat an earlier
spec (told that spec's result, ``reused_from``) cost nothing and do not count.

Dead workers: on RDB storage (PostgreSQL) every running trial records heartbeats, and any worker fails
stale trials before asking; `RetryFailedTrialCallback` enqueues them again. On the default journal file
(one machine) a trial records its host and pid, and a worker fails and re-enqueues running trials of
processes on this host that no longer exist. Ctrl-C does the same for the interrupted trial at once.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from moeforge.compiler import ModelSpec, account
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from ._space import Infeasible, constraint_values, describe, grid_space, spec_key, suggest, trial_to_spec
from ._spec import SearchSpec, train_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: Evaluate one spec at one seed: (spec, seed, budget_flops, out_dir, on_eval) -> the trainer's summary.
Evaluate = Callable[[ModelSpec, int, float, Path, Callable[[float, dict], None]], dict]

MAX_SKIPS = 200  # consecutive proposals that train nothing before the space counts as exhausted
HEARTBEAT_ENV = "MOEFORGE_SEARCH_HEARTBEAT_S"


class TrialFailed(Exception):
    """A trial that cannot finish (diverged, out of memory); recorded as FAIL and the search goes on."""


class SearchStop(Exception):
    """A problem with the run itself (storage, a study of another search); one line for the user."""


# -------------------------------------------------------------------------------------------- storage
def default_storage(run_dir: Path) -> str:
    return str(run_dir / "study.journal")


def is_rdb(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql", "sqlite")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A journal file (a path) for one machine, or an RDB URL (``postgresql://...``) with heartbeats."""
    if not is_rdb(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        url = f"postgresql+psycopg://{rest}"  # psycopg 3 under SQLAlchemy 2
    interval = int(os.environ.get(HEARTBEAT_ENV, "30"))
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={} if scheme.startswith("sqlite") else {"pool_pre_ping": True},
            heartbeat_interval=interval,
            grace_period=2 * interval,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        raise SearchStop(f"cannot open storage {redact(url)}: {str(e).splitlines()[0]}") from None


def redact(url: str) -> str:
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


def constraint_names(search: SearchSpec) -> list[str]:
    """Names of the trial constraints: ``valid_spec`` first, then each limit the search sets."""
    c = search.constraints
    limits = ("max_params_total", "max_params_activated", "max_forward_flops_per_token", "max_memory_bytes")
    return ["valid_spec", *(n for n in limits if getattr(c, n) is not None)]


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


def make_sampler(search: SearchSpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    s = search.sampler
    seed = s.seed + worker
    if s.kind == "grid":
        return _GridSampler(grid_space(search), seed=seed)
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.kind == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise SearchStop("sampler.kind gp needs scipy: pip install scipy (or use tpe)") from None
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.kind == "nsga2":
        pop = min(50, max(4, search.n_trials // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials)


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
    return search.model_dump(mode="json", exclude={"n_trials", "timeout_s"})


def open_study(search: SearchSpec, storage_url: str, study_name: str, worker: int = 0) -> optuna.Study:
    """Create the study or join it; refuse a study that holds a different search."""
    storage = open_storage(storage_url)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=search.directions,
            sampler=make_sampler(search, worker),
            pruner=make_pruner(search),
            load_if_exists=True,
        )
    except ValueError as e:
        raise SearchStop(f"study {study_name!r}: {e}") from None
    held = study.user_attrs.get("search")
    if held is None:
        study.set_user_attr("search", search.model_dump(mode="json"))
    elif _comparable(SearchSpec.model_validate(held)) != _comparable(search):
        raise SearchStop(
            f"study {study_name!r} in {redact(storage_url)} holds a different search; "
            "use another --study or --out, or the same search spec and budget"
        )
    return study


def stored_search(study: optuna.Study) -> SearchSpec:
    held = study.user_attrs.get("search")
    if held is None:
        raise SearchStop(
            f"study {study.study_name!r} was not made by moeforge search (no search spec stored)"
        )
    return SearchSpec.model_validate(held)


# --------------------------------------------------------------------------------------- counting
def _died(t: FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and (
        "fail_reason" not in t.user_attrs or t.user_attrs.get("died", False)
    )


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count toward n_trials: they trained (or are training) and their worker did not die."""
    return [
        t
        for t in trials
        if t.user_attrs.get("counted")
        and t.state != TrialState.WAITING
        and not _died(t)
        and not t.user_attrs.get("skipped")
    ]


# --------------------------------------------------------------------------------------- evaluation
def real_evaluator(search: SearchSpec, device: str | None = None) -> Evaluate:
    """Build each spec and train it with `moeforge.runtime.train` on the search's corpus."""
    import torch
    from moeforge.compiler import build
    from moeforge.runtime import Diverged, OutOfMemory, load_corpus, train

    dev = device or search.train.device
    if search.train.cpu_threads:
        torch.set_num_threads(search.train.cpu_threads)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    corpora: dict[int, Any] = {}
    s = search.train

    def evaluate(
        spec: ModelSpec, seed: int, budget: float, out_dir: Path, on_eval: Callable[[float, dict], None]
    ) -> dict:
        if spec.vocab_size not in corpora:
            corpora[spec.vocab_size] = load_corpus(s.data, vocab_size=spec.vocab_size)
        model = None
        try:
            model = build(spec, device=dev, seed=seed)
            cfg = train_config(search, budget_flops=budget, seed=seed, device=dev)
            return train(
                model,
                seq_len=spec.seq_len,
                train_flops_per_token=account(spec).train_flops_per_token,
                corpus=corpora[spec.vocab_size],
                cfg=cfg,
                out_dir=out_dir,
                on_eval=on_eval,
                progress=False,
                extra_summary={"spec_name": spec.name},
            )
        except (Diverged, OutOfMemory, torch.cuda.OutOfMemoryError) as e:
            kind = "diverged" if isinstance(e, Diverged) else "out of memory"
            raise TrialFailed(f"{kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return evaluate


def fake_evaluator(seconds: float, eval_points: int = 4) -> Evaluate:
    """A fast stand-in for training (tests, dry runs): a smooth loss of the spec's shape, `seconds` long.

    Lower for larger m and one shared expert, so searches have something to find. A spec named
    ``diverge`` raises TrialFailed like a diverged run.
    """

    def evaluate(
        spec: ModelSpec, seed: int, budget: float, out_dir: Path, on_eval: Callable[[float, dict], None]
    ) -> dict:
        if spec.name == "diverge":
            raise TrialFailed("diverged: loss is nan (fake)")
        d = spec.moe_derived
        m, ks = (d.m or 1, d.shared_experts) if d else (1, 0)
        final = 2.0 + 0.3 / math.sqrt(m) + 0.05 * abs(ks - 1) + 0.1 / spec.n_layers + 0.001 * seed
        tokens = int(budget // account(spec).train_flops_per_token)
        for k in range(1, eval_points + 1):
            time.sleep(seconds / eval_points)
            on_eval(k / eval_points, {"val_loss": final + (eval_points - k) * 0.5})
        return {
            "initial_val_loss": 5.5,
            "final_val_loss": final,
            "val_bits_per_byte": final / math.log(2),
            "tokens": tokens,
            "train_flops": tokens * account(spec).train_flops_per_token,
            "budget_flops": budget,
            "tokens_per_second": tokens / max(seconds, 1e-9),
        }

    return evaluate


# -------------------------------------------------------------------------------------- worker loop
@dataclass
class WorkerOptions:
    run_dir: Path
    worker: int = 0
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)


def _heartbeats(storage: optuna.storages.BaseStorage) -> bool:
    # RDB storage comes wrapped in optuna's cache, which is a BaseHeartbeat too.
    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


class _Heartbeat:
    """Record heartbeats for a running trial in a thread (study.optimize does this; ask/tell does not)."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self.enabled = _heartbeats(storage)
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()

    def __enter__(self) -> _Heartbeat:
        if self.enabled:
            assert isinstance(self.storage, BaseHeartbeat)
            interval = self.storage.get_heartbeat_interval() or 30
            self.storage.record_heartbeat(self.trial_id)

            def beat() -> None:
                while not self.stop.wait(interval):
                    with contextlib.suppress(Exception):  # a missed beat is retried next interval
                        self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]

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
    """Fail and re-enqueue running trials whose worker is gone; returns their numbers."""
    if _heartbeats(study._storage):
        return _fail_stale(study)
    host = socket.gethostname()
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid and pid != os.getpid() and not _alive(pid):
            _fail_and_retry(study, t, "worker died")
            out.append(t.number)
    return out


def _fail_stale(study: optuna.Study) -> list[int]:
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    optuna.storages.fail_stale_trials(study)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(before & failed)


def _fail_and_retry(study: optuna.Study, t: FrozenTrial | optuna.Trial, why: str) -> None:
    storage = study._storage
    trial_id = t._trial_id
    storage.set_trial_user_attr(trial_id, "died", why)
    try:
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except Exception:  # noqa: BLE001 - someone else finished or failed it first
        return
    params = t.params
    study.enqueue_trial(params, user_attrs={"retry_of": t.number})


def run_worker(search: SearchSpec, study: optuna.Study, evaluate: Evaluate, opts: WorkerOptions) -> int:
    """Propose, check and train trials until the cap, the timeout, or an exhausted space; returns trials trained."""
    cap = search.n_trials
    deadline = time.monotonic() + search.timeout_s if search.timeout_s else math.inf
    metric = search.objective.metric
    n_cons = len(constraint_names(search))
    prefix = f"[w{opts.worker}]"
    skips = trained = 0
    sampler = study.sampler
    while True:
        if time.monotonic() > deadline:
            opts.log(f"{prefix} timeout reached")
            break
        for n in reap_dead(study):
            opts.log(f"{prefix} trial {n}: its worker died; failed and queued again")
        if len(counted(study.get_trials(deepcopy=False))) >= cap:
            break
        if skips >= MAX_SKIPS or (
            isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)
        ):
            opts.log(f"{prefix} the space is exhausted: no new feasible spec in the last proposals")
            break
        trial = study.ask()
        if _heartbeats(study._storage):  # from the start, so a worker killed right now is found stale
            study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("worker", opts.worker)
        params = suggest(trial, search)
        label = ", ".join(f"{k}={v}" for k, v in params.items())
        # ---- analytic checks: nothing is built before these pass
        try:
            spec = trial_to_spec(search, params)
        except Infeasible as e:
            _constrain(trial, search, [1.0] + [0.0] * (n_cons - 1))
            trial.set_user_attr("infeasible", str(e))
            study.tell(trial, state=TrialState.PRUNED)
            opts.log(f"{prefix} trial {trial.number} ({label}): infeasible, {e}")
            skips += 1
            continue
        cons = [0.0, *constraint_values(search, spec)]
        _constrain(trial, search, cons)
        for k, v in describe(spec).items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("spec", spec.model_dump(mode="json"))
        key = spec_key(spec)
        trial.set_user_attr("spec_key", key)
        if any(c > 0 for c in cons):
            why = _violations(search, cons)
            trial.set_user_attr("infeasible", why)
            study.tell(trial, state=TrialState.PRUNED)
            opts.log(f"{prefix} trial {trial.number} ({label}): infeasible, {why}")
            skips += 1
            continue
        earlier = _same_spec(study, key, trial.number)
        if earlier is not None:
            trial.set_user_attr("reused_from", earlier.number)
            for k in (
                "fail_reason",
                "train_flops",
                "budget_flops",
                "tokens",
                "value_mean",
                "value_std",
                "seed_values",
            ):
                if k in earlier.user_attrs:
                    trial.set_user_attr(k, earlier.user_attrs[k])
            if earlier.state == TrialState.COMPLETE:
                study.tell(trial, earlier.values)
            else:
                study.tell(trial, state=earlier.state)
            opts.log(
                f"{prefix} trial {trial.number} ({label}): same spec as trial {earlier.number}, result reused"
            )
            skips += 1
            continue
        trial.set_user_attr("counted", True)
        ahead = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(ahead) >= cap:  # other workers filled the cap since we looked
            trial.set_user_attr("skipped", "n_trials reached by other workers")
            study.tell(trial, state=TrialState.FAIL)
            break
        skips = 0
        # ---- train, once per seed
        try:
            with _Heartbeat(study._storage, trial._trial_id):
                state, values = _train_trial(search, spec, trial, evaluate, opts, label, metric)
        except KeyboardInterrupt:
            _fail_and_retry(study, trial, "interrupted")
            opts.log(f"{prefix} trial {trial.number}: interrupted; it runs again when the search resumes")
            raise
        trained += 1
        if state == TrialState.COMPLETE:
            study.tell(trial, values)
        else:
            study.tell(trial, state=state)
        _log_best(study, prefix, opts.log)
    return trained


def _train_trial(
    search: SearchSpec,
    spec: ModelSpec,
    trial: optuna.Trial,
    evaluate: Evaluate,
    opts: WorkerOptions,
    label: str,
    metric: str,
) -> tuple[TrialState, list[float] | None]:
    prefix = f"[w{opts.worker}]"
    budget = search.budget.train_flops
    prune = search.pruner.kind != "none"
    eval_points = search.train.eval_points
    values: list[float] = []
    summaries: list[dict] = []
    trial_dir = opts.run_dir / "trials" / f"{trial.number:04d}"
    for i, seed in enumerate(search.seeds):
        out_dir = trial_dir / f"seed-{seed}" if len(search.seeds) > 1 else trial_dir

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
        except TrialFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            opts.log(f"{prefix} trial {trial.number} ({label}): FAILED, {e}")
            return TrialState.FAIL, None
        value = summary.get("final_val_loss") if metric == "val_loss" else summary.get("val_bits_per_byte")
        if value is None or not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"no finite {metric} in the trainer's summary")
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
    if len(values) > 1:
        trial.set_user_attr("seed_values", values)
        trial.set_user_attr("value_std", statistics.stdev(values))
        trial.set_user_attr("train_flops_all", [s.get("train_flops") for s in summaries])
    mean = statistics.fmean(values)
    trial.set_user_attr("value_mean", mean)
    out = [mean]
    if search.objective.params_total:
        out.append(float(account(spec).params_total))
    opts.log(f"{prefix} trial {trial.number} ({label}): done, {metric} {mean:.4f}")
    return TrialState.COMPLETE, out


def _violations(search: SearchSpec, cons: list[float]) -> str:
    c = search.constraints
    names = [
        n
        for n, v in (
            ("max_params_total", c.max_params_total),
            ("max_params_activated", c.max_params_activated),
            ("max_forward_flops_per_token", c.max_forward_flops_per_token),
            ("max_memory_bytes", c.max_memory_bytes),
        )
        if v is not None
    ]
    return ", ".join(f"{n} exceeded by {v:.1%}" for n, v in zip(names, cons[1:], strict=True) if v > 0)


def _same_spec(study: optuna.Study, key: str, number: int) -> FrozenTrial | None:
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=finished):
        if t.number < number and t.user_attrs.get("spec_key") == key and not t.user_attrs.get("infeasible"):
            if t.state == TrialState.FAIL and _died(t) or t.user_attrs.get("skipped"):
                continue
            return t
    return None


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The lowest-loss complete trial that trained itself (reused results point at their original)."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "reused_from" not in t.user_attrs
    ]
    return min(done, key=lambda t: t.values[0]) if done else None


def _log_best(study: optuna.Study, prefix: str, log: Callable[[str], None]) -> None:
    b = best_trial(study)
    if b is not None:
        log(f"{prefix} best so far: trial {b.number}, value {b.values[0]:.4f} ({_params_label(b.params)})")


def _params_label(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
