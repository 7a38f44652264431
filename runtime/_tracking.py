"""Run tracking: a run's curves sent, as they are logged, to TensorBoard, Weights & Biases or MLflow.

The trainer holds one `Trackers` (torchtitan's metric-logger component), chosen when the trainer is built
from a `Tracking` (which trackers, where, and the run's group, name and parameters); every record the
trainer writes to metrics.jsonl goes to each tracker too, as named scalars at its optimizer step:

    train/loss, train/ce, train/aux, train/lr, train/grad_norm, train/tokens_per_s, train/flops_per_s
    load/max_cv, load/max_over_mean, load/dead_experts, load/dropped_fraction (the worst MoE layer's)
    load/layer{i}/cv, load/layer{i}/max_over_mean, load/layer{i}/dead, load/layer{i}/dropped_fraction
    eval/val_loss, eval/val_bits_per_byte

A run belongs to a group (a search's study; the spec's name for `moeforge train`) and carries its
parameters (a trial's sampled parameters): TensorBoard gets one folder per run under ``ROOT/tensorboard/
GROUP/NAME`` with the parameters as hparams and as text; W&B gets ``group=GROUP``, ``name=NAME``,
``config=PARAMS`` (its files under ROOT; ``WANDB_MODE=offline`` keeps them there); MLflow gets an
experiment GROUP holding a run NAME with the parameters as params and tags (tracking URI
``MLFLOW_TRACKING_URI``, else the SQLite store ``ROOT/mlflow.db``: ``mlflow ui --backend-store-uri
sqlite:///ROOT/mlflow.db``).

A tracker that cannot start (say W&B online without a login) stops the run before training, in one line
(`TrackerFailed`); one that fails later is dropped with a warning, and training goes on: the curves are
in metrics.jsonl either way.

The libraries are optional extras (``pip install 'moeforge[tensorboard]'``): `check_trackers` says which one
is missing, in one line, before anything is built. Only rank 0 of a multi-process run tracks.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""What ``--log`` accepts; each is also the name of the extra that installs it."""


class MissingTracker(ValueError):
    """A tracker's library is not installed; the message names the extra to install."""


class TrackerFailed(ValueError):
    """A tracker could not start; the message names it and says why, in one line."""


def check_trackers(kinds: Iterable[str]) -> tuple[str, ...]:
    """The trackers asked for, each once and known and importable; else one line naming the fix.

    Raises:
        MissingTracker: a known tracker whose library is not installed.
        ValueError: an unknown tracker name.
    """
    out = tuple(dict.fromkeys(kinds))
    for kind in out:
        if kind not in TRACKERS:
            raise ValueError(f"--log: unknown tracker {kind!r}; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(kind) is None:
            raise MissingTracker(
                f"--log {kind}: the {kind} package is not installed: pip install 'moeforge[{kind}]'"
            )
    return out


@dataclass(frozen=True)
class Tracking:
    """Which trackers a run reports to, and what it is: the trainer builds its `Trackers` from this."""

    kinds: tuple[str, ...]
    root: Path
    """Where file-based trackers write: TensorBoard's event files, W&B's run folders, MLflow's file store."""
    group: str
    """The runs that belong together: a search's study, or the spec's name for `moeforge train`."""
    name: str
    """This run within its group: a trial and seed (``trial-3/seed-0``), or the run dir's name."""
    params: dict[str, Any] = field(default_factory=dict)
    """The run's parameters (a trial's sampled values): hparams, config, params and tags."""


_LOAD = ("cv", "max_over_mean", "dead", "dropped_fraction")
"""Per-layer load figures of a train record's ``load``."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record (``kind`` train or eval) as named scalars; non-numbers and NaN are left out."""
    out: dict[str, float] = {}
    if record.get("kind") == "train":
        for k in ("loss", "ce", "aux", "lr", "grad_norm", "tokens_per_s", "flops_per_s"):
            out[f"train/{k}"] = record.get(k)  # type: ignore[assignment]
        seen: dict[str, list[float]] = {k: [] for k in _LOAD}
        for i, stats in (record.get("load") or {}).items():
            for k in _LOAD:
                v = stats.get(k)
                if isinstance(v, (int, float)):
                    out[f"load/layer{i}/{k}"] = v
                    seen[k].append(v)
        # the worst layer's figures (dead experts: all layers'), as summary.json's "load" reports them
        for k, name, worst in (
            ("cv", "max_cv", max),
            ("max_over_mean", "max_over_mean", max),
            ("dropped_fraction", "dropped_fraction", max),
            ("dead", "dead_experts", sum),
        ):
            if seen[k]:
                out[f"load/{name}"] = worst(seen[k])
    elif record.get("kind") == "eval":
        for k in ("val_loss", "val_bits_per_byte"):
            out[f"eval/{k}"] = record.get(k)  # type: ignore[assignment]
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


def _flat(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as the libraries take them: numbers, strings and bools; anything else as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}


class _TensorBoard:
    def __init__(self, t: Tracking):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(t.root / "tensorboard" / t.group / t.name))
        params = _flat(t.params)
        if params:
            # in this run's own folder (SummaryWriter.add_hparams would open another one), so the HParams
            # dashboard lists every run of the group with its parameters against its final eval loss
            file_writer = self.writer.file_writer
            assert file_writer is not None  # SummaryWriter opens it in its constructor
            for summary in hparams(params, {"eval/val_loss": math.nan}):
                file_writer.add_summary(summary)
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("params", f"| parameter | value |\n|---|---|\n{table}", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class _Wandb:
    def __init__(self, t: Tracking):
        import wandb

        t.root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "moeforge"),
            group=t.group,
            name=t.name,
            config=_flat(t.params),
            tags=[f"{k}={v}"[:64] for k, v in t.params.items()],
            dir=str(t.root),
            reinit="create_new",  # one process trains several trials, each its own run
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)


class _Mlflow:
    def __init__(self, t: Tracking):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        t.root.mkdir(parents=True, exist_ok=True)
        root = t.root.resolve()
        # MLflow 3 keeps its file store in maintenance mode and recommends SQLite; artifacts (none are
        # logged) would go next to it
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(t.group)
        exp_id = exp.experiment_id if exp is not None else self._create(t.group, root / "mlartifacts")
        params = _flat(t.params)
        self.run_id = self.client.create_run(exp_id, run_name=t.name).info.run_id
        self.client.log_batch(
            self.run_id,
            params=[Param(k, str(v)[:500]) for k, v in params.items()],
            tags=[RunTag(f"param.{k}", str(v)[:500]) for k, v in params.items()],
        )

    def _create(self, name: str, artifacts: Path) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=artifacts.as_uri())
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")


_MAKERS: dict[str, Callable[[Tracking], Tracker]] = {
    "tensorboard": _TensorBoard,
    "wandb": _Wandb,
    "mlflow": _Mlflow,
}


class Trackers:
    """The trackers of one run (none: every call is a no-op). The trainer calls `log` with each
    metrics.jsonl record and `close` with the run's final status."""

    def __init__(self, tracking: Tracking | None = None, enabled: bool = True):
        self.trackers: dict[str, Tracker] = {}
        if tracking is None or not enabled:
            return
        for kind in check_trackers(tracking.kinds):
            try:
                self.trackers[kind] = _MAKERS[kind](tracking)
            except Exception as e:
                self.close("failed")
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise TrackerFailed(f"--log {kind}: could not start: {type(e).__name__}: {first}") from e

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if not values:
            return
        for kind, t in list(self.trackers.items()):
            try:
                t.log(int(record.get("step", 0)), values)
            except Exception as e:  # noqa: BLE001 - a tracker's outage must not end a long run
                warnings.warn(f"--log {kind}: stopped logging ({type(e).__name__}: {e})", stacklevel=2)
                del self.trackers[kind]

    def close(self, status: str) -> None:
        trackers, self.trackers = self.trackers, {}
        for kind, t in trackers.items():
            try:
                t.close(status)
            except Exception as e:  # noqa: BLE001 - never mask how the run ended
                warnings.warn(f"--log {kind}: could not close ({type(e).__name__}: {e})", stacklevel=2)
