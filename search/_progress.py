"""The live display of a running search on a terminal: trials done of the cap, failures, the best trial so
far with its parameters, elapsed and estimated time left. The log lines still print, above it.

Off (every method a plain pass-through) when the command's output is not a terminal or with ``--json``:
the log lines are then all there is, as before. The counts are read from the study by the thread that runs
the search (after each log line, and at each poll of the worker processes); rich's refresh thread only
redraws them, with the clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import IO, Any

import optuna
from optuna.trial import TrialState

from ._spec import SearchSpec
from ._trials import best_trial, counted


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class SearchProgress:
    """A rich Live display of one search (a context manager); `enabled=False` makes it a no-op."""

    def __init__(self, search: SearchSpec, done_before: int, enabled: bool, log: Callable[[str], None]):
        self.search, self.enabled, self._log = search, enabled, log
        self.done_before = self.done = done_before
        self.failed = self.running = 0
        self.best: str = "none yet"
        self.t0 = time.monotonic()
        self._live: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> SearchProgress:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                get_renderable=self.render,
                console=Console(stderr=True),
                refresh_per_second=2,
                transient=False,
                # stray prints of the trainer (warnings) go above the display too
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def log(self, line: str) -> None:
        """A log line: printed above the display (or as before, when it is off)."""
        if self._live is None:
            self._log(line)
            return
        from rich.text import Text

        with self._lock:
            self._live.console.print(Text(line))

    def update(self, study: optuna.Study) -> None:
        """Read the counts and the best trial from the study."""
        if self._live is None:
            return
        trials = counted(study.get_trials(deepcopy=False))
        finished = [t for t in trials if t.state.is_finished()]
        done, running = len(finished), len(trials) - len(finished)
        failed = sum(t.state == TrialState.FAIL for t in finished)
        best = best_trial(study)
        text = "none yet"
        if best is not None:
            params = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
            )
            text = f"trial {best.number}, {self.search.objective.metric} {best.values[0]:.4f}" + (
                f" ({params})" if params else ""
            )
        with self._lock:
            self.done, self.running, self.failed, self.best = done, running, failed, text

    def render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            done, running, failed, best = self.done, self.running, self.failed, self.best
        n = self.search.n_trials
        elapsed = time.monotonic() - self.t0
        new = done - self.done_before
        eta = _clock(elapsed / new * max(n - done, 0)) if new > 0 else "-"
        head = Table.grid(padding=(0, 1))
        head.add_row(
            Text(f"search {self.search.name}", style="bold"),
            ProgressBar(total=max(n, 1), completed=min(done, n), width=24),
            Text(f"{done}/{n} trials done"),
        )
        return Group(
            head,
            Text(f"  {running} running, {failed} failed; elapsed {_clock(elapsed)}, left ~{eta}"),
            Text(f"  best so far: {best}"),
        )

    def forward(self, stream: IO[str]) -> threading.Thread:
        """Print a worker process's stderr lines above the display, from a thread of its own."""

        def pump() -> None:
            for line in stream:
                self.log(line.rstrip("\n"))

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        return t
