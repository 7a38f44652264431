"""`search --log`: each trial's training curves go to the trackers as one run of the study's group, named
after the trial and seed and carrying the trial's sampled parameters (`moeforge.runtime.Tracking`).

The worker loop names the trial it is about to train (`trial_started`); the evaluator, which sees a spec and
a seed only, asks `SearchTracking.for_seed` for that trial's `Tracking` when it starts the trainer.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.runtime import Tracking


@dataclass(frozen=True)
class _Trial:
    number: int
    params: dict[str, Any]


_CURRENT: ContextVar[_Trial | None] = ContextVar("moeforge_search_trial", default=None)


def trial_started(number: int, params: dict[str, Any]) -> None:
    """Called by the worker loop before it trains trial `number` (in the thread that trains it)."""
    _CURRENT.set(_Trial(number, dict(params)))


@dataclass(frozen=True)
class SearchTracking:
    """The trackers of a search (``--log``), its run dir and its study: every trial is a run of the group
    named after the study, under the run dir (``RUN_DIR/tensorboard/STUDY/trial-N/seed-S``)."""

    kinds: tuple[str, ...]
    run_dir: Path
    study: str

    def for_seed(self, seed: int) -> Tracking | None:
        """The current trial's `Tracking` at this seed; None without trackers."""
        if not self.kinds:
            return None
        trial = _CURRENT.get()
        name = f"trial-{trial.number}/seed-{seed}" if trial is not None else f"seed-{seed}"
        return Tracking(self.kinds, self.run_dir, self.study, name, trial.params if trial is not None else {})
