"""Budgeted training: a model, a corpus and a compute budget in, a run dir and a summary out.

The budget. Exactly one of `budget_flops`, `tokens` or `steps` fixes the run's token count, optionally
capped by a wall-clock `time_s`; `time_s` alone trains until the time is up. A FLOP budget C becomes
tokens = floor(C / train_flops_per_token) with the caller's analytic count (the core accounting), and the
token count is hit exactly: every step takes `batch_size` sequences of `seq_len` tokens except the last,
which takes fewer sequences and, when the remainder is not a whole sequence, one shortened sequence. So
`train_flops` = tokens * train_flops_per_token is within one token's FLOPs of the budget.

The step. AdamW (betas 0.9/0.95) with decoupled weight decay on matrices only: norms, biases and embedding
tables are not decayed (decay pulls rarely seen token rows toward zero and fights the norms' scale; a tied
output head is the embedding and is not decayed either). Loss = cross entropy + the model's `aux_loss` (the
balance losses the spec asks for); both are logged. Gradient accumulation splits a batch into
`micro_batch_size` sequences, each micro-batch's loss weighted by its share of the step's tokens. Gradients
are clipped by global norm. On CUDA the forward runs under bf16 autocast with fp32 weights and optimizer
state. `compile` wraps the model in torch.compile for the full-size micro-batches; the odd-shaped last step
and evaluation run eagerly, so nothing recompiles.

The schedule is a function of the fraction p of the run's tokens done after the step (of the wall-clock
limit in time-only runs): linear warmup over the first `warmup` of the run, then cosine from `lr` down to
`lr * min_lr_ratio`, or WSD: constant, then linear decay to the same floor over the last `decay_fraction`.

Resuming. A run dir's checkpoint holds weights, AdamW state, the data sampler's generator state, RNG
states, tokens and step done. Resuming recomputes the plan for the new budget and keeps going: a resumed
run that was interrupted ends where the uninterrupted run would (bitwise on CPU). Resuming to a *larger*
budget recomputes the schedule for the new total at the tokens already done, with no second warmup. For
cosine, the learning rate therefore jumps from the old run's floor back up to the new curve's value (at
half of a doubled budget, about 55% of the peak) and anneals again; for WSD it returns to the stable rate.
The result is close to, but not the same as, a run planned for the larger budget from the start.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ._config import TrainConfig
from ._data import Corpus
from ._metrics import LoadTracker

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"


class Diverged(RuntimeError):
    """The loss or gradient became NaN or infinite."""


class OutOfMemory(RuntimeError):
    """The device (or host) ran out of memory."""


# ---------------------------------------------------------------------------------------------- pieces


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; anything else as torch reads it (cuda without CUDA fails)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but CUDA is not available here")
    return device


def lr_at(cfg: TrainConfig, p: float) -> float:
    """Learning rate at fraction p of the run (see the module docstring)."""
    p = min(max(p, 0.0), 1.0)
    low = cfg.lr * cfg.min_lr_ratio
    if p < cfg.warmup:
        return cfg.lr * p / cfg.warmup
    if cfg.schedule == "cosine":
        q = (p - cfg.warmup) / (1 - cfg.warmup)
        return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * q))
    start = 1 - cfg.decay_fraction
    if p <= start:
        return cfg.lr
    return cfg.lr + (low - cfg.lr) * (p - start) / cfg.decay_fraction


def planned_tokens(cfg: TrainConfig, seq_len: int, train_flops_per_token: int) -> int | None:
    """Tokens the run trains (None for a time-only run)."""
    if cfg.budget_flops is not None:
        return int(cfg.budget_flops // train_flops_per_token)
    if cfg.tokens is not None:
        return int(cfg.tokens)
    if cfg.steps is not None:
        return int(cfg.steps) * cfg.batch_size * seq_len
    return None


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, embedding tables)."""
    no_decay = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            no_decay.add(id(m.weight))
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for p in dict.fromkeys(model.parameters()):  # unique, in registration order
        if not p.requires_grad:
            continue
        (rest if p.dim() < 2 or id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda" or None
    )


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list, device: torch.device, bits_per_byte) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    total, n = torch.zeros((), device=device, dtype=torch.float64), 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device):
                logits = model(x).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            n += y.numel()
    finally:
        model.train(was_training)
    loss = float(total) / max(n, 1)
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


# ---------------------------------------------------------------------------------------------- train


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
) -> dict[str, Any]:
    """Train `model` on `corpus` within `cfg`'s budget; return the summary (also written to out_dir).

    Args:
        model: built by the caller; returns `.logits` [B, S, V] and `.aux_loss`; trained in place.
        seq_len: tokens per training sequence.
        train_flops_per_token: the analytic training FLOPs per token (budget -> tokens, FLOP/s).
        corpus: train and validation tokens.
        cfg: budget, batch, optimizer, device.
        out_dir: run dir for metrics.jsonl, summary.json and checkpoint/; None keeps nothing on disk.
        resume: continue from out_dir's checkpoint (to cfg's budget, which may be larger).
        on_eval: called as on_eval(fraction, metrics) at each evaluation point; whatever it raises
            propagates after summary.json records the stop.
        progress: show a live progress bar on stderr.
        extra_summary: merged into the summary.

    Raises:
        Diverged: the loss or gradient norm became NaN/inf.
        OutOfMemory: the device or host ran out of memory.
        moeforge.runtime.DataError: the corpus cannot supply a sequence.
        FileExistsError / FileNotFoundError: out_dir already holds a run (without resume) / has no checkpoint.
    """
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else None
    total_tokens = planned_tokens(cfg, seq_len, train_flops_per_token)
    micro = cfg.micro_batch_size or cfg.batch_size
    torch.manual_seed(cfg.seed)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    tracker = LoadTracker(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    st = _State()
    metrics_path = ckpt_path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path, ckpt_path = out_dir / METRICS_FILE, out_dir / CHECKPOINT_DIR
        found = find_checkpoint(ckpt_path)
        if resume:
            if found is None:
                raise FileNotFoundError(f"{out_dir}: no checkpoint to resume from")
            saved, tensors = load_checkpoint(found, model, optimizer)
            st = _State(
                step=saved["step"],
                tokens=saved["tokens"],
                train_s=saved["train_s"],
                wall_s=saved["wall_s"],
                initial_val_loss=saved.get("initial_val_loss"),
                segments=list(saved.get("segments", [])),
            )
            gen.set_state(tensors["rng.data"])
            torch.set_rng_state(tensors["rng.torch"])
            if device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)
            tracker.load_state_tensors(tensors, device)
            _trim_metrics(metrics_path, st.step)
            if total_tokens is not None and total_tokens < st.tokens:
                raise ValueError(
                    f"{out_dir}: the run already trained {st.tokens:,} tokens, more than the new budget's "
                    f"{total_tokens:,}; give a larger budget to continue it"
                )
        elif found is not None or (out_dir / SUMMARY_FILE).exists():
            raise FileExistsError(f"{out_dir} already holds a run; resume it or choose another output folder")
    st.segments.append(total_tokens)
    wall_before = st.wall_s

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def fraction() -> float:
        if total_tokens is not None:
            return st.tokens / total_tokens if total_tokens else 1.0
        return min(wall() / cfg.time_s, 1.0)  # type: ignore[operator]

    def log(record: dict) -> None:
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    val_batches = corpus.val_batches(micro, seq_len, cfg.eval_tokens)
    fwd = torch.compile(model) if cfg.compile else model
    # any nn.Module trains; ours may route with a bias
    update_biases = getattr(model, "update_biases", lambda: None)
    n_evals = max(cfg.eval_points, 1)
    next_eval = 1
    while st.step > 0 and next_eval < n_evals and next_eval / n_evals <= fraction() + 1e-12:
        next_eval += 1  # resumed past these evaluation points
    last_val: dict[str, Any] = {}
    status, stopped_by = "running", "budget"
    bar = _Progress(progress, float(total_tokens or cfg.time_s or 1), f"train {_fmt(total_tokens or 0)} tok")
    window = {"steps": 0, "ce": 0.0, "aux": 0.0, "tokens": 0, "t": 0.0}
    last_checkpoint = time.perf_counter()

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        tensors = {"rng.data": gen.get_state(), "rng.torch": torch.get_rng_state(), **tracker.state_tensors()}
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "step": st.step,
            "tokens": st.tokens,
            "train_s": st.train_s,
            "wall_s": wall(),
            "initial_val_loss": st.initial_val_loss,
            "segments": st.segments,
            "seq_len": seq_len,
            "train_flops_per_token": train_flops_per_token,
            "config": cfg.to_dict(),
        }
        save_checkpoint(ckpt_path, model, optimizer, state, tensors)

    def do_eval(frac: float, call: bool) -> dict[str, Any]:
        nonlocal last_val
        res = _evaluate(model, val_batches, device, corpus.bits_per_byte)
        last_val = {
            "kind": "eval",
            "step": st.step,
            "tokens": st.tokens,
            "train_flops": st.tokens * train_flops_per_token,
            "fraction": round(frac, 6),
            **res,
            "wall_s": round(wall(), 3),
        }
        log(last_val)
        if call and on_eval is not None:
            on_eval(frac, dict(last_val))
        return last_val

    def summary() -> dict[str, Any]:
        s = {
            "status": status,
            "stopped_by": stopped_by,
            "initial_val_loss": st.initial_val_loss,
            "final_val_loss": last_val.get("val_loss"),
            "val_bits_per_byte": last_val.get("val_bits_per_byte"),
            "tokens": st.tokens,
            "train_flops": st.tokens * train_flops_per_token,
            "budget_flops": cfg.budget_flops,
            "planned_tokens": total_tokens,
            "train_flops_per_token": train_flops_per_token,
            "tokens_per_second": st.tokens / st.train_s if st.train_s > 0 else None,
            "flops_per_second": st.tokens * train_flops_per_token / st.train_s if st.train_s > 0 else None,
            "steps": st.step,
            "wall_s": round(wall(), 3),
            "train_s": round(st.train_s, 3),
            "device": str(device),
            "seq_len": seq_len,
            "params": sum(p.numel() for p in dict.fromkeys(model.parameters())),
            "corpus": corpus.name,
            "segments": st.segments,
            "load": tracker.summary(),
            "config": cfg.to_dict(),
            **(extra_summary or {}),
        }
        if out_dir is not None:
            _write_json(out_dir / SUMMARY_FILE, s)
        return s

    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        if st.initial_val_loss is None:
            st.initial_val_loss = do_eval(0.0, call=False)["val_loss"]
        while True:
            if total_tokens is not None and st.tokens >= total_tokens:
                break
            if cfg.time_s is not None and wall() >= cfg.time_s:
                stopped_by = "time"
                break
            t0 = time.perf_counter()
            step_tokens = cfg.batch_size * seq_len
            if total_tokens is not None:
                step_tokens = min(step_tokens, total_tokens - st.tokens)
            full, rem = divmod(step_tokens, seq_len)
            shapes = [(min(micro, full - i), seq_len) for i in range(0, full, micro)] + (
                [(1, rem)] if rem else []
            )
            ce_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            for n, length in shapes:
                x, y = corpus.sample_batch("train", n, seq_len, gen)
                if length < seq_len:
                    x, y = x[:, :length], y[:, :length]
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                w = n * length / step_tokens
                with _autocast(device):
                    out = (fwd if (n, length) == (micro, seq_len) else model)(x)
                    ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
                    aux = out.aux_loss.float()
                ((ce + aux) * w).backward()
                tracker.update()
                ce_sum += ce.detach() * w
                aux_sum += aux.detach() * w
            gnorm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            ce_v, aux_v, gn_v = torch.stack([ce_sum, aux_sum, gnorm.float()]).tolist()
            if not (math.isfinite(ce_v) and math.isfinite(aux_v) and math.isfinite(gn_v)):
                what = "loss" if not math.isfinite(ce_v + aux_v) else "gradient norm"
                raise Diverged(
                    f"training diverged: the {what} became {ce_v + aux_v if what == 'loss' else gn_v} at step "
                    f"{st.step + 1} ({st.tokens:,} tokens, lr {optimizer.param_groups[0]['lr']:.3g}); "
                    "try a lower learning rate"
                )
            tokens_after = st.tokens + step_tokens
            p = tokens_after / total_tokens if total_tokens else fraction()
            lr = lr_at(cfg, p)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_biases()  # DeepSeek-V3's sign rule for selection biases, after each step
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            st.step += 1
            st.tokens = tokens_after
            st.train_s += dt
            window["steps"] += 1
            window["ce"] += ce_v
            window["aux"] += aux_v
            window["tokens"] += step_tokens
            window["t"] += dt
            tps = window["tokens"] / window["t"] if window["t"] > 0 else 0.0
            done = total_tokens is not None and st.tokens >= total_tokens
            bar.update(
                st.tokens if total_tokens is not None else wall(),
                f"step {st.step}  loss {ce_v + aux_v:.4f}  {_fmt(tps)} tok/s  "
                f"{_fmt(tps * train_flops_per_token)}FLOP/s",
            )
            if st.step % cfg.log_every == 0 or done:
                k = window["steps"]
                log(
                    {
                        "kind": "train",
                        "step": st.step,
                        "tokens": st.tokens,
                        "fraction": round(fraction(), 6),
                        "lr": lr,
                        "loss": (window["ce"] + window["aux"]) / k,
                        "ce": window["ce"] / k,
                        "aux": window["aux"] / k,
                        "grad_norm": gn_v,
                        "tokens_per_s": tps,
                        "flops_per_s": tps * train_flops_per_token,
                        "wall_s": round(wall(), 3),
                        "load": tracker.window_stats(),
                    }
                )
                window = {"steps": 0, "ce": 0.0, "aux": 0.0, "tokens": 0, "t": 0.0}
            while next_eval < n_evals and fraction() >= next_eval / n_evals - 1e-12:
                do_eval(next_eval / n_evals, call=True)
                next_eval += 1
            if (
                ckpt_path is not None
                and not done
                and time.perf_counter() - last_checkpoint >= cfg.checkpoint_every_s
            ):
                checkpoint()
                last_checkpoint = time.perf_counter()
        bar.close()
        do_eval(fraction() if stopped_by == "time" and total_tokens is not None else 1.0, call=True)
        status = "completed"
        checkpoint()
        return summary()
    except Diverged:
        status = "diverged"
        raise
    except torch.OutOfMemoryError as e:
        status = "out_of_memory"
        raise OutOfMemory(_oom_message(device, e)) from None
    except (MemoryError, RuntimeError) as e:
        if not _is_cpu_oom(e):
            status = f"failed: {type(e).__name__}"
            raise
        status = "out_of_memory"
        raise OutOfMemory(_oom_message(device, e)) from None
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as e:
        if status == "running":
            status = f"stopped: {type(e).__name__}"
        raise
    finally:
        bar.close()
        tracker.close()
        if status != "completed":
            with contextlib.suppress(Exception):  # never mask the original error
                summary()
