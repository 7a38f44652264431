"""A run's summary: what `train` returns and writes to a run dir's summary.json.

One typed object crosses from the trainer to its readers (the search, the CLI renderers, the
benchmarks), serialized in one place: `to_dict` gives summary.json's keys in their order, and
`from_dict` / `read` read it back. A summary.json written before a key existed still loads (that key
takes its default); a key this version does not know is an error that names it.

No torch here: reading a run dir's summary costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"

# keys a caller may add (train's `extra_summary`): written only when given
_OPTIONAL = ("spec_name", "world", "spec", "run_dir", "branch", "branch_point")


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """One training run's outcome, as summary.json holds it (see `moeforge.runtime.train`)."""

    status: str
    """``completed``, ``diverged``, ``out_of_memory``, ``interrupted``, ``failed: Kind`` or ``stopped: Kind``."""
    stopped_by: str
    """What ended the run: ``budget`` (the token count) or ``time`` (the wall-clock limit)."""
    initial_val_loss: float | None
    """Validation loss (nats per token) before the first step; None if the run stopped before it."""
    final_val_loss: float | None
    """Validation loss at the end; None if the run stopped before its last evaluation."""
    val_bits_per_byte: float | None
    """The final loss in bits per byte of text; None where the corpus does not know its bytes per token."""
    tokens: int
    """Training tokens done, over all resumed segments and processes."""
    train_flops: int
    """tokens x train_flops_per_token."""
    budget_flops: float | None
    """The FLOP budget asked for; None for a token, step or time budget."""
    planned_tokens: int | None
    """Tokens the budget plans (of the last segment's budget); None for a time-only run."""
    train_flops_per_token: int
    """The analytic training FLOPs per token the budget was divided by."""
    tokens_per_second: float | None
    """Training tokens per second of training-step time; None when no step ran."""
    flops_per_second: float | None
    """Achieved training FLOP/s (tokens_per_second x train_flops_per_token); None when no step ran."""
    steps: int
    """Optimizer steps done."""
    wall_s: float
    """Wall-clock seconds over all segments, evaluations and checkpoints included."""
    train_s: float
    """Seconds spent in training steps over all segments."""
    device: str
    """The torch device rank 0 trained on (``cpu``, ``cuda:0``)."""
    environment: dict[str, Any] | None = None
    """Software and hardware the run trained on (`moeforge.runtime.environment`); absent in older runs."""
    processes: int = 1
    """Processes the run trained on (the torchrun world size); absent in older, single-process runs."""
    seq_len: int
    """Tokens per training sequence."""
    params: int
    """Parameters of the trained model (unique tensors' numel)."""
    corpus: str
    """The corpus's name."""
    segments: list[int | None]
    """Tokens planned by each invocation of the run: one entry, plus one per resume."""
    load: dict[str, Any]
    """Routed-expert load over the run (`moeforge.runtime.LoadTracker.summary`): per layer and worst."""
    config: dict[str, Any]
    """The training config (`TrainConfig.to_dict`)."""
    spec_name: str | None = None
    """The spec's name, as the search records it; omitted from summary.json when not given."""
    world: int | None = None
    """A search's torchrun group size; omitted from summary.json when not given."""
    spec: str | None = None
    """The spec's name, as `moeforge train` records it; omitted from summary.json when not given."""
    run_dir: str | None = None
    """The run dir, as `moeforge train` records it; omitted from summary.json when not given."""
    branch: str | None = None
    """The stable-phase checkpoint a WSD cooldown started from (`train_cooldown`); omitted when not given."""
    branch_point: dict[str, Any] | None = None
    """A search's branched cooldown: its stable run and branch point in tokens; omitted when not given."""

    def to_dict(self) -> dict[str, Any]:
        """summary.json's content: its keys in their order, the optional keys only when given."""
        return {
            f.name: getattr(self, f.name)
            for f in _FIELDS
            if f.name not in _OPTIONAL or getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        """A summary from summary.json's content; a key missing in an older file takes its default.

        Raises:
            ValueError: a key this version does not know, or a required key missing (each named).
        """
        names = {f.name for f in _FIELDS}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"summary: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        missing = [
            f.name
            for f in _FIELDS
            if f.name not in d
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"summary: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """Read a summary.json (a run dir or the file itself).

        Raises:
            OSError: the file cannot be read. ValueError: it is not JSON, or see `from_dict`.
        """
        path = Path(path)
        if path.is_dir():
            path = path / SUMMARY_FILE
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a JSON object")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


_FIELDS = dataclasses.fields(RunSummary)
