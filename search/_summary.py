"""What a search run returns: counts of its trials, the best trial's record, and where it ran.

`run_search` returns a `SearchResult`; ``moeforge search --json`` prints its `to_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._records import TrialRecord

_RUN_KEYS = ("storage", "study", "run_dir", "workers", "interrupted", "worker_errors")


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """A search's outcome (`run_search`), or its results as written (`write_results`: no run fields)."""

    trials: int
    """Trials in the study, of every state."""
    counted: int
    """Trials that count toward ``n_trials``."""
    complete: int
    """Complete trials that trained (not reused results)."""
    failed: int
    """Failed trials that were not retried (each has a ``fail_reason``)."""
    best: TrialRecord | None
    """The best trial's record; None before any trial completes."""
    branched_tokens: tuple[int, int] | None = None
    """(tokens trained, tokens separate runs would have trained) of a branched-cooldown ladder; None without."""
    plots: list[str] = field(default_factory=list)
    """The plots written under plots/, by name."""
    storage: str | None = None
    """The study's storage URL (a password redacted); None from `write_results`."""
    study: str | None = None
    """The study's name; None from `write_results`."""
    run_dir: str | None = None
    """The run dir; None from `write_results`."""
    workers: int | None = None
    """Worker processes that ran here; None from `write_results`."""
    interrupted: bool | None = None
    """True when Ctrl-C stopped the run (`run_search` then raises KeyboardInterrupt)."""
    worker_errors: list[int] | None = None
    """Exit statuses of worker processes that failed."""

    def to_dict(self) -> dict[str, Any]:
        """As ``moeforge search --json`` prints it (the run's fields only when set)."""
        out: dict[str, Any] = {
            "trials": self.trials,
            "counted": self.counted,
            "complete": self.complete,
            "failed": self.failed,
            "best": self.best.to_dict() if self.best is not None else None,
            "branched_tokens": list(self.branched_tokens) if self.branched_tokens is not None else None,
            "plots": self.plots,
        }
        out.update({k: getattr(self, k) for k in _RUN_KEYS if getattr(self, k) is not None})
        return out
