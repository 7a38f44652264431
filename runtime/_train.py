"""Budgeted training: a model, a corpus and a compute budget in, a run dir and a summary out.

The budget. Exactly one of `budget_flops`, `tokens` or `steps` fixes the run's token count, optionally
capped by a wall-clock `time_s`; `time_s` alone trains until the time is up. A FLOP budget C becomes
tokens = floor(C / train_flops_per_token) with the caller's analytic count (the core accounting), and the
token count is hit exactly: every step takes `batch_size` sequences of `seq_len` tokens except the last,
which takes fewer sequences and, when the remainder is not a whole sequence, one shortened sequence. So
`train_flops` = tokens * train_flops_per_token is within one token's FLOPs of the budget.

The step. AdamW (betas 0.9 and `beta2`, default 0.95) with decoupled weight decay on matrices only: norms, biases and embedding
tables are not decayed (decay pulls rarely seen token rows toward zero and fights the norms' scale; a tied
output head is the embedding and is not decayed either). Loss = cross entropy + the model's `aux_loss` (the
balance losses the spec asks for); both are logged. Gradient accumulation splits a batch into
`micro_batch_size` sequences, each micro-batch's loss weighted by its share of the step's tokens. Gradients
are clipped by global norm. On CUDA the forward runs under bf16 autocast with fp32 weights and optimizer
state. `compile` wraps the model in torch.compile for the full-size micro-batches; the odd-shaped last step
and evaluation run eagerly, so nothing recompiles.

The schedule is a function of the fraction p of the run's tokens done after the step (of the wall-clock
limit in time-only runs): linear warmup over the first `warmup` of the run (or the first `warmup_tokens`),
then cosine from `lr` down to `lr * min_lr_ratio`, or WSD (warmup-stable-decay, Hägele et al. 2024): constant,
then a cooldown to the same floor over the last `cooldown` of the run, lr scaled by 1 - sqrt(q) at its
fraction q. With `warmup_tokens`, a WSD run's learning rate up to its cooldown does not depend on the run's
total, so one stable run, checkpointed where each budget's cooldown starts, serves a ladder of budgets
(`runtime/_branch.py`).

Resuming. A run dir's checkpoint holds weights, AdamW state, the data sampler's generator state, RNG
states, tokens and step done, and the seed and corpus it trained with (a resume with another is refused: the
data order would silently change). Resuming recomputes the plan for the new budget and keeps going: a
resumed run that was interrupted ends where the uninterrupted run would (bitwise on CPU; to float rounding
when the number of processes changes). Resuming to a *larger*
budget recomputes the schedule for the new total at the tokens already done, with no second warmup. For
cosine, the learning rate therefore jumps from the old run's floor back up to the new curve's value (at
half of a doubled budget, about 55% of the peak) and anneals again; for WSD it returns to the stable rate.
The result is close to, but not the same as, a run planned for the larger budget from the start.

Several processes (torchrun, `runtime/_dist.py`). A run means the same on any number of processes:
`batch_size` is the global batch (micro batch x accumulation x world size), budgets and token counts are
global. Every rank draws the same global batch of windows from one generator seeded alike (the batch a
one-process run draws) and reads only its own contiguous share of the rows; the last, short step may leave a
rank fewer micro-batches (or none), and since every forward of a sharded model is a collective, every rank
makes the same number of forwards: the missing ones run in eval mode (no routing load counted) with zero
weight. Each micro-batch's loss is weighted by its share of the global step's tokens times the world size,
since DDP and FSDP2 average gradients over ranks. `parallel: ddp` wraps the model in
DistributedDataParallel (buffers are not broadcast: the per-rank routing counts are all-reduced instead);
`fsdp` applies FSDP2's `fully_shard` to each block, then the root (bf16 parameters with fp32 gradient
reduction on CUDA; the selection biases stay whole and replicated, moved by the sign rule alike on every
rank). Validation windows are split across ranks and the sums all-reduced. What must agree across ranks is
reduced, never decided locally: loss and load statistics, the selection-bias counts, the global gradient
norm, and the clock (rank 0's, for the time limit, time-only schedules and checkpoint cadence). Rank 0
writes the run dir.

Run dir: metrics.jsonl (train lines every `log_every` steps with MoE load per layer, eval lines),
summary.json (written at the end, also when the run stops with an error, with `status`), checkpoint/
(see `_checkpoint`). Checkpoints are written every `checkpoint_every_s` seconds and at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import _dist
from ._checkpoint import find_checkpoint, load_checkpoint, load_optimizer, save_checkpoint
from ._config import TrainConfig
from ._data import Corpus, _check_fits, _windows
from ._environment import environment
from ._metrics import LoadTracker
from ._schedule import lr_at, make_optimizer, planned_tokens
from ._summary import SUMMARY_FILE, RunSummary
from ._tracking import Trackers, Tracking

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"


class Diverged(RuntimeError):
    """The loss or gradient became NaN or infinite."""


class OutOfMemory(RuntimeError):
    """The device (or host) ran out of memory."""


# ---------------------------------------------------------------------------------------------- pieces


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; anything else as torch reads it (cuda without CUDA fails).

    Under torchrun (WORLD_SIZE > 1), cuda without an index is this process's cuda:LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None and _dist.world_from_env() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _evaluate(
    model: nn.Module, batches: list, device: torch.device, bits_per_byte, d: _dist.Dist = _dist.Dist()
) -> dict[str, Any]:
    """Mean cross entropy over `batches`; with several ranks, rank r takes batches r, r + world, ... and
    the sums are all-reduced. Every rank makes the same number of forwards (a sharded model's forwards are
    collectives): one past the end repeats a batch and counts nothing."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # summed cross entropy, tokens
    try:
        for i in range(-(-len(batches) // d.world)):
            k = i * d.world + d.rank
            x, y = batches[min(k, len(batches) - 1)]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device):
                logits = model(x).logits
            if k < len(batches):
                total[0] += F.cross_entropy(
                    logits.float().flatten(0, 1), y.flatten(), reduction="sum"
                ).double()
                total[1] += y.numel()
    finally:
        model.train(was_training)
    ce, n = d.sum_(total).tolist()
    loss = ce / max(n, 1)
    return {"val_loss": loss, "val_bits_per_byte": bits_per_byte(loss) if math.isfinite(loss) else None}


def evaluate(
    model: nn.Module,
    corpus: Corpus,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    device: str | torch.device,
) -> dict[str, Any]:
    """Mean cross entropy on the corpus's fixed held-out windows: {"val_loss", "val_bits_per_byte"}.

    `val_bits_per_byte` is None where the corpus does not know the bytes per token.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device)
    try:
        return _evaluate(
            model, corpus.val_batches(batch_size, seq_len, eval_tokens), device, corpus.bits_per_byte
        )
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(_oom_message(device, e)) from None


def _oom_message(device: torch.device, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"out of memory on {device}: {first[:200]}; use a smaller --batch-size or micro batch"


def _is_cpu_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after `step` (written by a crashed run after its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _fmt(n: float) -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


class _Progress:
    """rich live bar on stderr; a no-op when disabled."""

    def __init__(self, enabled: bool, total: float, label: str):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task(label, total=total, info="")
        self.bar.start()

    def update(self, completed: float, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    train_s: float = 0.0  # time in training steps, all segments
    wall_s: float = 0.0  # wall time, all segments
    initial_val_loss: float | None = None
    segments: list = field(default_factory=list)  # tokens planned by each invocation (resume history)


# ---------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class _Plan:
    """How the budget becomes steps, and each step's global batch becomes this rank's micro-batches."""

    total_tokens: int | None
    """Tokens the run trains; None for a time-only run."""
    seq_len: int
    batch_size: int
    """Sequences per step, over all ranks."""
    micro: int
    """Sequences per forward on one rank."""
    d: _dist.Dist

    @property
    def per_rank(self) -> int:
        return self.batch_size // self.d.world

    def step_tokens(self, done: int) -> int:
        """Tokens of the next step: a whole batch, or what is left of the budget."""
        full = self.batch_size * self.seq_len
        return full if self.total_tokens is None else min(full, self.total_tokens - done)

    def layout(self, step_tokens: int) -> tuple[int, list[tuple[int, int, int]], int]:
        """Rows of the global batch, this rank's micro-batches as (first row, rows, length), and the number of
        forwards every rank makes.

        The global batch is `full` whole sequences and, when the step's tokens are no whole number of
        sequences, one shortened sequence (the last row, a micro-batch of its own). Rank r holds rows
        [r * per_rank, (r + 1) * per_rank).
        """
        full, rem = divmod(step_tokens, self.seq_len)
        rows = full + (1 if rem else 0)

        def micro_batches(r: int) -> list[tuple[int, int, int]]:
            lo, hi = r * self.per_rank, min((r + 1) * self.per_rank, rows)
            whole = min(hi, full)
            out = [(i, min(self.micro, whole - i), self.seq_len) for i in range(lo, whole, self.micro)]
            return out + ([(full, 1, rem)] if rem and lo <= full < hi else [])

        forwards = max(len(micro_batches(r)) for r in range(self.d.world))
        return rows, micro_batches(self.d.rank), forwards


class _Batches:
    """Training batches: each step's window starts come from one generator, seeded alike on every rank, so
    every rank sees the global batch a one-process run draws; each reads only its own rows. The next step's
    batch is read ahead (pinned, copied with non_blocking=True) while the current step computes."""

    def __init__(self, corpus: Corpus, plan: _Plan, seed: int, device: torch.device):
        self.data, self.plan, self.device = corpus.train, plan, device
        _check_fits(corpus.name, "train", len(self.data), plan.seq_len)
        self.gen = torch.Generator().manual_seed(seed)
        self._taken = self.gen.get_state()  # the generator after the last batch taken (checkpointed)
        self._ahead: tuple[int, list, torch.Tensor] | None = None  # (step tokens, batches, state before)

    def state(self) -> torch.Tensor:
        return self._taken

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)
        self._taken, self._ahead = state, None

    def take(self, step_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """This rank's micro-batches (x, y, rows, length) of the next step, on the device."""
        if self._ahead is not None and self._ahead[0] != step_tokens:
            self.gen.set_state(self._ahead[2])  # read ahead for another step size: draw again
            self._ahead = None
        batches = self._ahead[1] if self._ahead is not None else self._read(step_tokens)
        self._ahead = None
        self._taken = self.gen.get_state()
        return batches

    def prefetch(self, step_tokens: int) -> None:
        before = self.gen.get_state()
        self._ahead = (step_tokens, self._read(step_tokens), before)

    def _read(self, step_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
        S = self.plan.seq_len
        rows, mine, _ = self.plan.layout(step_tokens)
        starts = torch.randint(len(self.data) - S, (rows,), generator=self.gen).tolist()
        out = []
        for first, n, length in mine:
            x, y = _windows(self.data, starts[first : first + n], S)  # [n, S]
            if length < S:  # the run's last, shorter step
                x, y = x[:, :length].contiguous(), y[:, :length].contiguous()
            if self.device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            out.append(
                (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), n, length)
            )
        return out


class _StepTimer:
    """Seconds spent in training steps: perf_counter on the CPU; on CUDA, events read only when asked (at log
    points and the end), so no step waits for the GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds_done = 0.0
        self._pending: list[tuple[Any, Any]] = []
        self._t0: Any = None

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self.seconds_done += time.perf_counter() - self._t0

    def seconds(self) -> float:
        for start, end in self._pending:
            end.synchronize()
            self.seconds_done += start.elapsed_time(end) / 1000
        self._pending = []
        return self.seconds_done


# ---------------------------------------------------------------------------------------------- trainer


def _parameters_of(fn: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


class Trainer:
    """One training run. `run()` evaluates, then loops over `train_step()` (which calls
    `forward_backward_step()` per micro-batch), logging, evaluating and checkpointing on their schedules.

    The constructor sets everything up once: process group, device, plan, data, resume, the model's
    parallel wrapper and the optimizer. Arguments as `train`'s.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        seq_len: int,
        train_flops_per_token: int,
        corpus: Corpus,
        cfg: TrainConfig,
        out_dir: Path | None = None,
        resume: bool = False,
        on_eval: Callable[[float, dict], None] | None = None,
        progress: bool = True,
        extra_summary: dict | None = None,
        tracking: Tracking | None = None,
    ):
        self.t_start = time.perf_counter()
        self.cfg, self.corpus, self.seq_len, self.fpt = cfg, corpus, seq_len, train_flops_per_token
        self.on_eval, self.extra_summary = on_eval, extra_summary
        self.d = _dist.init_distributed(cfg.device)
        self.device = resolve_device(cfg.device)
        self.plan = self._make_plan()
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.model.train()
        self.tracker = LoadTracker(self.model)
        self.batches = _Batches(corpus, self.plan, cfg.seed, self.device)
        self.timer = _StepTimer(self.device)
        self.st = _State()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.metrics_path = self.out_dir / METRICS_FILE if self.out_dir is not None else None
        self.ckpt_path = self.out_dir / CHECKPOINT_DIR if self.out_dir is not None else None
        found = self._find_run(resume)
        if found is not None:
            self._restore(found)  # weights into the whole model, before it is wrapped or sharded
        self.wrapped = self._parallelize()
        self.fwd = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if found is not None:
            load_optimizer(found, self.model, self.optimizer)
        self.st.segments.append(self.plan.total_tokens)
        self.wall_before = self.st.wall_s
        self.train_s_before = self.st.train_s
        self.tokens_before = self.st.tokens
        self.clock = self.wall_before  # rank 0's wall time, agreed at the top of each step
        self.val_batches = corpus.val_batches(self.plan.micro, seq_len, cfg.eval_tokens)
        self.n_evals = max(cfg.eval_points, 1)
        self.next_eval = 1
        while self.st.step > 0 and self.next_eval < self.n_evals and self._due(self.next_eval):
            self.next_eval += 1  # resumed past these evaluation points
        self.last_val: dict[str, Any] = {}
        self.status, self.stopped_by = "running", "budget"
        self.window = {"steps": 0, "ce": 0.0, "aux": 0.0, "tokens": 0, "t": self.timer.seconds()}
        self.last_checkpoint = time.perf_counter()
        self.branch_at: dict[int, Path] = {}
        """Extra checkpoints: tokens done -> folder, written after the step that ends there (`_branch`)."""
        total = self.plan.total_tokens
        self.bar = _Progress(
            progress and self.d.main, float(total or cfg.time_s or 1), f"train {_fmt(total or 0)} tok"
        )
        self.trackers = Trackers(tracking, enabled=self.d.main)  # last: a run that fails to set up has none

    # ---- plan

    def _make_plan(self) -> _Plan:
        cfg, world = self.cfg, self.d.world
        if cfg.batch_size % world:
            raise ValueError(
                f"batch_size: {cfg.batch_size} is not a multiple of the {world} processes; the global batch "
                "splits evenly over them"
            )
        per_rank = cfg.batch_size // world
        micro = min(cfg.micro_batch_size or per_rank, per_rank)
        total = planned_tokens(cfg, self.seq_len, self.fpt)
        return _Plan(total, self.seq_len, cfg.batch_size, micro, self.d)

    def _find_run(self, resume: bool) -> Path | None:
        """The checkpoint to resume from; refuses to overwrite a run."""
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        assert self.ckpt_path is not None
        found = find_checkpoint(self.ckpt_path)
        if resume:
            if found is None:
                raise FileNotFoundError(f"{self.out_dir}: no checkpoint to resume from")
            return found
        if found is not None or (self.out_dir / SUMMARY_FILE).exists():
            raise FileExistsError(
                f"{self.out_dir} already holds a run; resume it or choose another output folder"
            )
        return None

    def _restore(self, found: Path) -> None:
        saved, tensors = load_checkpoint(found, self.model)
        for key, now in (("seed", self.cfg.seed), ("corpus", self.corpus.name)):
            if key in saved and saved[key] != now:
                raise ValueError(
                    f"{self.out_dir}: the run was trained with {key} {saved[key]!r}, not {now!r}; resume it with "
                    f"the same {key}, or start a new run"
                )
        self.st = _State(
            step=saved["step"],
            tokens=saved["tokens"],
            train_s=saved["train_s"],
            wall_s=saved["wall_s"],
            initial_val_loss=saved.get("initial_val_loss"),
            segments=list(saved.get("segments", [])),
        )
        self.batches.load_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.d.main:  # the saved counts are the run's (all ranks'): they are summed when read
            self.tracker.load_state_tensors(tensors, self.device)
            _trim_metrics(self.metrics_path, self.st.step)  # type: ignore[arg-type]
        total = self.plan.total_tokens
        if total is not None and total < self.st.tokens:
            raise ValueError(
                f"{self.out_dir}: the run already trained {self.st.tokens:,} tokens, more than the new budget's "
                f"{total:,}; give a larger budget to continue it"
            )

    def _parallelize(self) -> nn.Module:
        """The module forwards run through: the model itself, DDP around it, or the model sharded in place."""
        if self.d.world == 1:
            return self.model
        cuda = self.device.type == "cuda"
        if self.cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # routing counts are per-rank buffers (all-reduced where used): never broadcast from rank 0
            no_sync: dict[str, Any] = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in _parameters_of(DDP)
                else {"broadcast_buffers": False}  # older torch
            )
            return DDP(self.model, device_ids=[self.device.index] if cuda else None, **no_sync)
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            fully_shard = None  # type: ignore[assignment]
        if fully_shard is None or "ignored_params" not in _parameters_of(fully_shard):
            raise ValueError(
                f"parallel: fsdp needs torch.distributed.fsdp.fully_shard with ignored_params (torch 2.7 or "
                f"later; this is {torch.__version__}); use ddp"
            )
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if cuda
            else MixedPrecisionPolicy()
        )
        # selection biases: no gradient, moved by the sign rule from all-reduced counts alike on every rank
        frozen = {p for p in self.model.parameters() if not p.requires_grad}
        for block in getattr(self.model, "layers", []):
            fully_shard(block, mp_policy=mp, ignored_params=frozen & set(block.parameters()) or None)
        fully_shard(self.model, mp_policy=mp, ignored_params=frozen or None)
        return self.model

    # ---- the loop

    def run(self) -> RunSummary:
        """Train to the budget; return the summary (also written to the run dir)."""
        cfg, total = self.cfg, self.plan.total_tokens
        try:
            if self.st.initial_val_loss is None:
                self.st.initial_val_loss = self.evaluate(0.0, call=False)["val_loss"]
            while True:
                self.clock, since_checkpoint = self._agree(
                    self.wall(), time.perf_counter() - self.last_checkpoint
                )
                if total is not None and self.st.tokens >= total:
                    break
                if cfg.time_s is not None and self.clock >= cfg.time_s:
                    self.stopped_by = "time"
                    break
                self.train_step()
                if self.st.tokens in self.branch_at:
                    self.checkpoint(self.branch_at[self.st.tokens])
                done = total is not None and self.st.tokens >= total
                while self.next_eval < self.n_evals and self._due(self.next_eval):
                    self.evaluate(self.next_eval / self.n_evals, call=True)
                    self.next_eval += 1
                if self.ckpt_path is not None and not done and since_checkpoint >= cfg.checkpoint_every_s:
                    self.checkpoint()
            self.bar.close()
            self.evaluate(
                self.fraction() if self.stopped_by == "time" and total is not None else 1.0, call=True
            )
            self.status = "completed"
            self.checkpoint()
            return self.summary()
        except Diverged:
            self.status = "diverged"
            raise
        except torch.OutOfMemoryError as e:
            self.status = "out_of_memory"
            raise OutOfMemory(_oom_message(self.device, e)) from None
        except (MemoryError, RuntimeError) as e:
            if not _is_cpu_oom(e):
                self.status = f"failed: {type(e).__name__}"
                raise
            self.status = "out_of_memory"
            raise OutOfMemory(_oom_message(self.device, e)) from None
        except KeyboardInterrupt:
            self.status = "interrupted"
            raise
        except BaseException as e:
            if self.status == "running":
                self.status = f"stopped: {type(e).__name__}"
            raise
        finally:
            self.bar.close()
            self.tracker.close()
            self.trackers.close(self.status)
            if self.status != "completed":
                with contextlib.suppress(Exception):  # never mask the original error
                    self.summary(reduce=False)  # no collective: another rank may be gone

    def train_step(self) -> None:
        """One optimizer step over the global batch: forward/backward per micro-batch, clip, step, biases."""
        cfg, st = self.cfg, self.st
        step_tokens = self.plan.step_tokens(st.tokens)
        _, _, forwards = self.plan.layout(step_tokens)
        batches = self.batches.take(step_tokens)
        self.timer.start()
        sums = torch.zeros(
            2, device=self.device
        )  # cross entropy, aux: weighted by share of the step's tokens
        for i in range(forwards):
            with self._grad_sync(last=i == forwards - 1):
                if i < len(batches):
                    x, y, n, length = batches[i]
                    w = n * length / step_tokens
                    sums += torch.stack(self.forward_backward_step(x, y, w)) * w
                else:
                    self._idle_forward_backward()
        gnorm = self._clip()
        ce_v, aux_v, gn_v = torch.cat([self.d.sum_(sums), gnorm.reshape(1).float()]).tolist()
        if not (math.isfinite(ce_v) and math.isfinite(aux_v) and math.isfinite(gn_v)):
            what = "loss" if not math.isfinite(ce_v + aux_v) else "gradient norm"
            raise Diverged(
                f"training diverged: the {what} became {ce_v + aux_v if what == 'loss' else gn_v} at step "
                f"{st.step + 1} ({st.tokens:,} tokens, lr {self.optimizer.param_groups[0]['lr']:.3g}); "
                "try a lower learning rate"
            )
        tokens_after = st.tokens + step_tokens
        total = self.plan.total_tokens
        lr = lr_at(cfg, tokens_after / total, tokens_after) if total else lr_at(cfg, self.fraction())
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_biases()  # DeepSeek-V3's sign rule for selection biases, after each step
        self.timer.stop()
        done = total is not None and tokens_after >= total
        if not done:
            self.batches.prefetch(self.plan.step_tokens(tokens_after))
        st.step += 1
        st.tokens = tokens_after
        self.log_step(step_tokens, ce_v, aux_v, gn_v, lr, done)

    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor, weight: float) -> list[torch.Tensor]:
        """Forward and backward of one micro-batch whose tokens are `weight` of the step's; returns the
        detached (cross entropy, aux loss)."""
        fwd = self.fwd if tuple(x.shape) == (self.plan.micro, self.seq_len) else self.wrapped
        with _autocast(self.device):
            out = fwd(x)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            aux = out.aux_loss.float()
        # DDP and FSDP2 average gradients over ranks; the step's loss is the sum of the shares
        ((ce + aux) * (weight * self.d.world)).backward()
        self.tracker.update()
        return [ce.detach(), aux.detach()]

    def _idle_forward_backward(self) -> None:
        """A rank with no rows left in a short last step still joins the collectives of a forward and backward:
        one token, zero weight, eval mode (no routing load is counted)."""
        x = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.wrapped.eval()
        try:
            with _autocast(self.device):
                out = self.wrapped(x)
                loss = out.logits.float().sum() + out.aux_loss.float()
            (loss * 0.0).backward()
        finally:
            self.wrapped.train()

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients over ranks only after the step's last micro-batch."""
        if self.wrapped is not self.model:  # DDP
            return contextlib.nullcontext() if last else self.wrapped.no_sync()  # type: ignore[operator]
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()

    def _clip(self) -> torch.Tensor:
        """Clip by the global gradient norm (over all ranks' shards under FSDP2); returns the norm."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        full = getattr(gnorm, "full_tensor", None)  # a DTensor under FSDP2
        return full() if callable(full) else gnorm

    def _update_biases(self) -> None:
        update = getattr(self.model, "update_biases", None)
        if update is None:
            return  # any nn.Module trains; ours may route with a bias
        if self.d.world > 1:
            update(reduce=self.d.sum_)  # every rank applies the update of the global counts
        else:
            update()

    # ---- time and schedule

    def wall(self) -> float:
        """This process's wall time over all segments of the run."""
        return self.wall_before + time.perf_counter() - self.t_start

    def _agree(self, *values: float) -> list[float]:
        """Rank 0's values on every rank: decisions from clocks must not differ between ranks."""
        if self.d.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.d.sum_(t if self.d.main else torch.zeros_like(t)).tolist()

    def fraction(self) -> float:
        total = self.plan.total_tokens
        if total is not None:
            return self.st.tokens / total if total else 1.0
        return min(self.clock / self.cfg.time_s, 1.0)  # type: ignore[operator]

    def _due(self, k: int) -> bool:
        return k / self.n_evals <= self.fraction() + 1e-12

    # ---- evaluate

    def evaluate(self, frac: float, call: bool) -> dict[str, Any]:
        """Validation loss on the fixed held-out windows (split over ranks); logged, and passed to on_eval."""
        res = _evaluate(self.model, self.val_batches, self.device, self.corpus.bits_per_byte, self.d)
        self.last_val = {
            "kind": "eval",
            "step": self.st.step,
            "tokens": self.st.tokens,
            "train_flops": self.st.tokens * self.fpt,
            "fraction": round(frac, 6),
            **res,
            "wall_s": round(self.wall(), 3),
        }
        self.log(self.last_val)
        if call and self.on_eval is not None:
            self.on_eval(frac, dict(self.last_val))
        return self.last_val

    # ---- log

    def log(self, record: dict) -> None:
        """A line in metrics.jsonl (rank 0), and the same figures to the run's trackers."""
        if self.metrics_path is not None and self.d.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.trackers.log(record)

    def log_step(self, step_tokens: int, ce: float, aux: float, gnorm: float, lr: float, done: bool) -> None:
        """The progress bar every step; a train line in metrics.jsonl every log_every steps and at the end."""
        st, w = self.st, self.window
        w["steps"] += 1
        w["ce"] += ce
        w["aux"] += aux
        w["tokens"] += step_tokens
        elapsed = time.perf_counter() - self.t_start  # this segment's; no wait for the GPU
        self.bar.update(
            st.tokens if self.plan.total_tokens is not None else self.wall(),
            f"step {st.step}  loss {ce + aux:.4f}  {_fmt((st.tokens - self.tokens_before) / max(elapsed, 1e-9))} tok/s",
        )
        if not (st.step % self.cfg.log_every == 0 or done):
            return
        now = self.timer.seconds()
        st.train_s = self.train_s_before + now
        tps = w["tokens"] / (now - w["t"]) if now > w["t"] else 0.0
        k = w["steps"]
        self.log(
            {
                "kind": "train",
                "step": st.step,
                "tokens": st.tokens,
                "fraction": round(self.fraction(), 6),
                "lr": lr,
                "loss": (w["ce"] + w["aux"]) / k,
                "ce": w["ce"] / k,
                "aux": w["aux"] / k,
                "grad_norm": gnorm,
                "tokens_per_s": tps,
                "flops_per_s": tps * self.fpt,
                "wall_s": round(self.wall(), 3),
                "load": self._window_load(),
            }
        )
        self.window = {"steps": 0, "ce": 0.0, "aux": 0.0, "tokens": 0, "t": now}

    def _layer_counts(self, counts: dict[int, torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        # every MoE layer, in order, on every rank: a rank that has counted nothing yet still joins the sum
        for i, moe in self.tracker.layers:
            n = getattr(moe, "n_routed", None)
            if i in counts or n is not None:
                yield (
                    i,
                    counts[i]
                    if i in counts
                    else torch.zeros(cast(int, n), dtype=torch.int64, device=self.device),
                )

    def _window_load(self) -> dict[str, Any]:
        if self.d.world > 1:
            self.tracker.window = {i: self.d.sum_(c) for i, c in self._layer_counts(self.tracker.window)}
        return self.tracker.window_stats()

    @contextlib.contextmanager
    def _run_load(self) -> Iterator[None]:
        """The tracker's run totals summed over ranks, for the time of the block."""
        if self.d.world == 1:
            yield
            return
        local = self.tracker.total
        self.tracker.total = {i: self.d.sum_(c.clone()) for i, c in self._layer_counts(local)}
        try:
            yield
        finally:
            self.tracker.total = local

    # ---- checkpoint

    def checkpoint(self, path: Path | None = None) -> None:
        """Write the checkpoint, or one to `path` (every rank calls: a sharded model is gathered; rank 0
        writes)."""
        path = path or self.ckpt_path
        if path is None:
            return
        self.st.train_s = self.train_s_before + self.timer.seconds()
        with self._run_load():
            load = self.tracker.state_tensors()
        tensors = {"rng.data": self.batches.state(), "rng.torch": torch.get_rng_state(), **load}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.st.step,
            "tokens": self.st.tokens,
            "train_s": self.st.train_s,
            "wall_s": self.clock if self.d.world > 1 else self.wall(),
            "initial_val_loss": self.st.initial_val_loss,
            "segments": self.st.segments,
            "seq_len": self.seq_len,
            "train_flops_per_token": self.fpt,
            "seed": self.cfg.seed,
            "corpus": self.corpus.name,
            "processes": self.d.world,
            "config": self.cfg.to_dict(),
        }
        save_checkpoint(path, self.model, self.optimizer, state, tensors)
        self.last_checkpoint = time.perf_counter()

    # ---- summary

    def summary(self, reduce: bool = True) -> RunSummary:
        """The run's summary; rank 0 writes it to summary.json. `reduce=False` (on errors) uses no collective
        and reports this rank's expert load only."""
        st, cfg = self.st, self.cfg
        st.train_s = self.train_s_before + self.timer.seconds()
        with self._run_load() if reduce else contextlib.nullcontext():
            load = self.tracker.summary()
        s = RunSummary(
            status=self.status,
            stopped_by=self.stopped_by,
            initial_val_loss=st.initial_val_loss,
            final_val_loss=self.last_val.get("val_loss"),
            val_bits_per_byte=self.last_val.get("val_bits_per_byte"),
            tokens=st.tokens,
            train_flops=st.tokens * self.fpt,
            budget_flops=cfg.budget_flops,
            planned_tokens=self.plan.total_tokens,
            train_flops_per_token=self.fpt,
            tokens_per_second=st.tokens / st.train_s if st.train_s > 0 else None,
            flops_per_second=st.tokens * self.fpt / st.train_s if st.train_s > 0 else None,
            steps=st.step,
            wall_s=round(self.wall(), 3),
            train_s=round(st.train_s, 3),
            device=str(self.device),
            environment=environment(self.device),
            processes=self.d.world,
            seq_len=self.seq_len,
            params=sum(p.numel() for p in dict.fromkeys(self.model.parameters())),
            corpus=self.corpus.name,
            segments=st.segments,
            load=load,
            config=cfg.to_dict(),
            **(self.extra_summary or {}),
        )
        if self.out_dir is not None and self.d.main:
            _write_json(self.out_dir / SUMMARY_FILE, s.to_dict())
        return s


def train(
    model: nn.Module,
    *,
    seq_len: int,
    train_flops_per_token: int,
    corpus: Corpus,
    cfg: TrainConfig,
    out_dir: Path | None = None,
    resume: bool = False,
    on_eval: Callable[[float, dict], None] | None = None,
    progress: bool = True,
    extra_summary: dict | None = None,
    tracking: Tracking | None = None,
) -> RunSummary:
    """Train `model` on `corpus` within `cfg`'s budget; return the summary (also written to out_dir).

    Under torchrun every process calls it alike (see the module docstring); rank 0 writes the run dir.

    Args:
        model: built by the caller; returns `.logits` [B, S, V] and `.aux_loss`; trained in place.
        seq_len: tokens per training sequence.
        train_flops_per_token: the analytic training FLOPs per token (budget -> tokens, FLOP/s).
        corpus: train and validation tokens.
        cfg: budget, batch, optimizer, device.
        out_dir: run dir for metrics.jsonl, summary.json and checkpoint/; None keeps nothing on disk.
        resume: continue from out_dir's checkpoint (to cfg's budget, which may be larger; same seed and data).
        on_eval: called as on_eval(fraction, metrics) at each evaluation point; whatever it raises
            propagates after summary.json records the stop.
        progress: show a live progress bar on stderr.
        extra_summary: `RunSummary`'s optional fields to set (spec_name, world, spec, run_dir).
        tracking: also send the curves to TensorBoard, W&B or MLflow (rank 0 only); see `Tracking`.

    Raises:
        Diverged: the loss or gradient norm became NaN/inf.
        OutOfMemory: the device or host ran out of memory.
        moeforge.runtime.DataError: the corpus cannot supply a sequence.
        FileExistsError / FileNotFoundError: out_dir already holds a run (without resume) / has no checkpoint.
        ValueError: resuming with another seed or corpus, or to a smaller budget than already trained.
    """
    return Trainer(
        model,
        seq_len=seq_len,
        train_flops_per_token=train_flops_per_token,
        corpus=corpus,
        cfg=cfg,
        out_dir=out_dir,
        resume=resume,
        on_eval=on_eval,
        progress=progress,
        extra_summary=extra_summary,
        tracking=tracking,
    ).run()
