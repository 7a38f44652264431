"""What one trial trains: the evaluator (one spec at one seed, in this process or as a torchrun group)
and the trial's run over its seeds, reporting to the pruner at equal fractions of its own budget.

Failures are data: whatever a trial raises fails that trial (``fail_reason``, ``fail_kind``, the
traceback in its folder) and the search goes on.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from moeforge.compiler import ModelSpec, account
from moeforge.runtime import torchrun_args
from optuna.trial import TrialState

from ._branching import BRANCH_ATTR, evaluate_branched
from ._errors import TrialFailed
from ._space import trial_budget
from ._spec import SearchSpec, train_config
from ._tracking import SearchTracking, trial_started
from ._training import job, rule_for, train_spec
from ._trials import trial_dir

if TYPE_CHECKING:
    from moeforge.runtime import Corpus, RunSummary, Tracking

#: Evaluate one spec at one seed: (spec, seed, budget_flops, out_dir, on_eval) -> the trainer's summary.
Evaluate = Callable[[ModelSpec, int, float, Path, Callable[[float, dict], None]], "RunSummary"]


def real_evaluator(
    search: SearchSpec, corpus: Corpus, device: str | None = None, tracking: SearchTracking | None = None
) -> Evaluate:
    """Build each spec and train it with `moeforge.runtime.train` on the search's corpus (its curves also
    to `tracking`'s trackers, when given).

    A seed whose folder holds a finished run is not trained again (its summary is returned); one that
    holds a checkpoint resumes from it.
    """
    import torch
    from moeforge.compiler import build
    from moeforge.runtime import find_checkpoint

    dev = device or search.train.device
    if search.train.cpu_threads:
        torch.set_num_threads(search.train.cpu_threads)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"

    def evaluate(
        spec: ModelSpec, seed: int, budget: float, out_dir: Path, on_eval: Callable[[float, dict], None]
    ) -> RunSummary:
        done = finished_summary(out_dir, budget)
        if done is not None:
            for k in range(1, search.train.eval_points + 1):
                on_eval(k / search.train.eval_points, {"val_loss": done.final_val_loss})
            return done
        resume = find_checkpoint(out_dir / "checkpoint") is not None
        if not resume:  # a run that stopped before its first checkpoint starts over
            for name in ("summary.json", "metrics.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        if search.train.devices_per_trial > 1:
            return _group_evaluate(search, spec, seed, budget, dev, out_dir, resume, on_eval)
        if search.train.branch_cooldowns and not resume:  # a budget of a branched ladder: its cooldown alone
            done = evaluate_branched(
                search, corpus, spec, seed, budget, out_dir, on_eval, dev, _for_seed(tracking, seed)
            )
            if done is not None:
                return done
        model = None
        rule = rule_for(search, spec, budget)
        cfg = train_config(search, budget_flops=budget, seed=seed, device=dev, rule=rule)
        try:
            model = build(spec, device=dev, seed=seed)
            return train_spec(
                model,
                spec,
                corpus,
                cfg,
                out_dir,
                resume=resume,
                on_eval=on_eval,
                tracking=_for_seed(tracking, seed),
            )
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return evaluate


def _for_seed(tracking: SearchTracking | None, seed: int) -> Tracking | None:
    return tracking.for_seed(seed) if tracking is not None else None


def _group_evaluate(
    search: SearchSpec,
    spec: ModelSpec,
    seed: int,
    budget: float,
    device: str,
    out_dir: Path,
    resume: bool,
    on_eval: Callable[[float, dict], None],
) -> RunSummary:
    """Train one seed as a torchrun group of `train.devices_per_trial` processes (`_group.py`); the
    evaluations are reported when the group has finished (so a pruner has nothing to act on: refused at
    load)."""
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
        why = group_failure(proc.stderr, proc.returncode)
        raise TrialFailed(f"{k}-process group failed: {why} (log: {out_dir / 'group.log'})")
    with contextlib.suppress(OSError, ValueError):  # the evaluations, for the log (no pruner with groups)
        for line in (out_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "eval" and rec.get("fraction", 0) > 0 and rec.get("val_loss") is not None:
                on_eval(float(rec["fraction"]), rec)
    from moeforge.runtime import RunSummary

    return RunSummary.read(out_dir)


# torchrun's own log lines (glog style: I1207 11:02:32.548 ...) and the decoration of its failure report
_LAUNCHER_LINE = re.compile(r"^(?:[IWEF]\d{4} |WARNING:|\*+$|=+$|-+$|\[\d+\]:$)")
# a process's exception line, which torch may prefix with its rank: [rank0]: IndexError: ...
_EXCEPTION_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?((?:\w+\.)*[A-Z]\w*(?:Error|Exception|Interrupt|Exit|Failed|Diverged|OutOfMemory)\b:?.*)$"
)


def group_failure(stderr: str, returncode: int) -> str:
    """The one line that says why a torchrun group failed, from its stderr: the first exception a
    process raised (the first observed failure; a peer's failure makes the others fail after it), not
    torchrun's own ChildFailedError; else torchrun's last line that is not a log line or decoration."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    raised = [m.group(1) for ln in lines if (m := _EXCEPTION_LINE.match(ln)) and "ChildFailedError" not in ln]
    if raised:
        return raised[0]
    report = next((i for i, ln in enumerate(lines) if "ChildFailedError" in ln), len(lines))
    rest = [
        ln
        for ln in lines[:report]  # before torchrun's own traceback and failure report
        if not ln.startswith((" ", "Traceback ")) and not _LAUNCHER_LINE.match(ln)
    ]
    return rest[-1] if rest else f"exit status {returncode}"


def finished_summary(out_dir: Path, budget: float) -> RunSummary | None:
    from moeforge.runtime import RunSummary

    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    with contextlib.suppress(ValueError, OSError):
        s = RunSummary.read(path)
        if s.status == "completed" and s.budget_flops == budget:
            return s
    return None


def train_trial(
    search: SearchSpec,
    spec: ModelSpec,
    trial: optuna.Trial,
    evaluate: Evaluate,
    run_dir: Path,
    log: Callable[[str], None],
    prefix: str,
    label: str,
) -> tuple[TrialState, list[float] | None]:
    """Train a checked trial once per seed into its spec's folder; returns its state and values.

    The first seed reports to the pruner; the trial's value is the mean over seeds (``value_mean``,
    ``seed_values``, ``value_std``), and what the first seed's summary says is recorded on the trial.
    """
    metric = search.objective.metric
    budget = trial_budget(search, trial.params)
    prune = search.pruner.kind != "none"
    eval_points = search.train.eval_points
    values: list[float] = []
    summaries: list[RunSummary] = []
    folder = trial_dir(run_dir, trial.user_attrs["spec_key"])
    trial.set_user_attr("trial_dir", str(folder.relative_to(run_dir)))
    trial_started(trial.number, trial.params)  # names the trackers' runs (search --log)
    for i, seed in enumerate(search.seeds):
        out_dir = folder / f"seed-{seed}"

        def on_eval(fraction: float, metrics: dict, seed: int = seed, first: bool = i == 0) -> None:
            value = metrics.get(metric, metrics.get("val_loss"))
            shown = "n/a" if value is None else f"{value:.4f}"  # no bits per byte for a non-finite loss
            log(
                f"{prefix} trial {trial.number} ({label}) seed {seed}: {fraction:4.0%} of budget, {metric} {shown}"
            )
            if first and prune and value is not None:
                trial.report(float(value), step=max(1, round(fraction * eval_points)))
                if trial.should_prune():
                    raise optuna.TrialPruned()

        try:
            summary = evaluate(spec, seed, budget, out_dir, on_eval)
        except optuna.TrialPruned:
            log(f"{prefix} trial {trial.number} ({label}): pruned")
            return TrialState.PRUNED, None
        except Exception as e:  # noqa: BLE001 - any failure of one trial is data, not a crash
            reason = _one_line(e)
            folder.mkdir(parents=True, exist_ok=True)
            tb = folder / f"trial-{trial.number}.traceback.txt"
            tb.write_text(f"trial {trial.number} seed {seed} ({label})\n{traceback.format_exc()}")
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_kind", type(e).__name__)
            trial.set_user_attr("traceback", str(tb.relative_to(run_dir)))
            log(f"{prefix} trial {trial.number} ({label}): FAILED, {reason} (traceback: {tb})")
            return TrialState.FAIL, None
        value = summary.final_val_loss if metric == "val_loss" else summary.val_bits_per_byte
        if value is None or not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"no finite {metric} in the trainer's summary")
            trial.set_user_attr("fail_kind", "NoMetric")
            return TrialState.FAIL, None
        values.append(float(value))
        summaries.append(summary)
    s0 = summaries[0]
    trial.set_user_attr("train_flops", s0.train_flops)
    trial.set_user_attr("budget_flops", s0.budget_flops)
    trial.set_user_attr("tokens", s0.tokens)
    trial.set_user_attr("initial_val_loss", s0.initial_val_loss)
    trial.set_user_attr("final_val_loss", s0.final_val_loss)
    trial.set_user_attr("val_bits_per_byte", s0.val_bits_per_byte)
    trial.set_user_attr("tokens_per_second", s0.tokens_per_second)
    # what makes the numbers comparable across machines (runtime/_environment.py)
    trial.set_user_attr("environment", s0.environment)
    if s0.branch_point is not None:  # a branched cooldown's stable run and branch point (`_branching.py`)
        trial.set_user_attr(BRANCH_ATTR, s0.branch_point)
    if s0.load:  # the trainer's always has "layers"; a stand-in evaluator's may be empty
        trial.set_user_attr("load", json.loads(json.dumps(s0.load, default=float)))
    cfg = train_config(
        search, budget_flops=budget, seed=search.seeds[0], device="cpu", rule=rule_for(search, spec, budget)
    )
    trial.set_user_attr("hparams", {"rule": search.train.hparams, "lr": cfg.lr, "batch_size": cfg.batch_size})
    trial.set_user_attr("seeds", list(search.seeds))
    trial.set_user_attr("seed_values", values)
    if len(values) > 1:
        trial.set_user_attr("value_std", statistics.stdev(values))
        trial.set_user_attr("train_flops_all", [s.train_flops for s in summaries])
    mean = statistics.fmean(values)
    trial.set_user_attr("value_mean", mean)
    out = [mean]
    if search.objective.params_total:
        out.append(float(account(spec).params_total))
    log(f"{prefix} trial {trial.number} ({label}): done, {metric} {mean:.4f}")
    return TrialState.COMPLETE, out


def _one_line(e: BaseException) -> str:
    """A failure as one line: the evaluator's own words for TrialFailed, else the type and first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, TrialFailed):
        return text or "failed"
    names = {"Diverged": "diverged", "OutOfMemory": "out of memory", "OutOfMemoryError": "out of memory"}
    kind = names.get(type(e).__name__, type(e).__name__)
    return f"{kind}: {text}" if text else kind
