"""moeforge train SPEC: train a spec on a corpus within a compute budget, into a run dir."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _types as T
from ._common import SPEC_HELP, add_overrides, console, print_json
from ._tracking import add_log_flag, check_log_flag, run_tracking

if TYPE_CHECKING:
    from moeforge.runtime import RunSummary

TRAIN_CONFIG_FILE = "train_config.json"
SPEC_FILE = "spec.yaml"
# flags that, when given with --resume, replace what the run dir recorded
_CFG_FLAGS = (
    "seed",
    "batch_size",
    "micro_batch_size",
    "lr",
    "schedule",
    "cooldown",
    "warmup_tokens",
    "beta2",
    "device",
    "parallel",
    "compile",
    "eval_tokens",
)
_BUDGET_FLAGS = ("budget_flops", "tokens", "steps", "time_s")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a spec within a compute budget (FLOPs, tokens, steps or time)",
        description="Train a model spec on the bundled corpus (or --data) within a budget. A FLOP budget C "
        "trains C / (training FLOPs per token) tokens, the analytic count of `moeforge report`. The run dir "
        "gets spec.yaml, train_config.json, metrics.jsonl, summary.json and checkpoint/ (safetensors). "
        "Exit status: 0 done, 1 failure (bad data), 2 bad input, 3 diverged, 4 out of memory.",
        epilog="examples:\n  moeforge train debug --budget-flops 2e12 --device cpu --out runs/dbg\n"
        "  moeforge train --resume --out runs/dbg --budget-flops 4e12\n"
        "  moeforge train debug --steps 50 --nproc 2 --parallel fsdp --device cpu --out runs/fsdp\n"
        "  torchrun --nproc_per_node 8 -m moeforge train my.yaml --budget-flops 1e18 --out runs/big\n"
        "  moeforge train my.yaml --tokens 5e6 --data corpus.txt --set moe.top_k=4 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec", nargs="?", metavar="SPEC", help=SPEC_HELP + "; with --resume, optional (or the run dir)"
    )
    add_overrides(p)
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget-flops", type=T.positive_float, metavar="C", help="training FLOPs (e.g. 2e12)")
    b.add_argument("--tokens", type=T.int_in(1, 10**15, floats=True), metavar="N", help="training tokens")
    b.add_argument("--steps", type=T.int_in(1, 10**9), metavar="N", help="optimizer steps")
    p.add_argument(
        "--time",
        dest="time_s",
        type=T.positive_float,
        metavar="S",
        help="wall-clock limit in seconds (alone or as a cap)",
    )
    p.add_argument("--device", type=T.device, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="a dataset folder of `moeforge data prepare`, text file/folder, .bin token file(s); default the "
        "bundled corpus",
    )
    p.add_argument(
        "--out", type=T.out_dir, metavar="DIR", help="run dir (default runs/<spec-name>-<timestamp>)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (or SPEC as run dir), also to a larger budget",
    )
    p.add_argument("--seed", type=T.seed, help="data order and initialization seed (default 0)")
    p.add_argument(
        "--batch-size", type=T.int_in(1, 2**20), metavar="B", help="sequences per step (default 16)"
    )
    p.add_argument(
        "--micro-batch-size", type=T.int_in(1, 2**20), metavar="M", help="gradient accumulation micro batch"
    )
    p.add_argument("--lr", type=T.positive_float, help="peak learning rate (default 3e-3)")
    p.add_argument("--schedule", choices=("cosine", "wsd"), help="learning-rate schedule (default cosine)")
    p.add_argument(
        "--cooldown",
        type=T.unit_interval,
        metavar="F",
        help="wsd: fraction of the run in the 1-sqrt cooldown (default 0.2)",
    )
    p.add_argument(
        "--warmup-tokens",
        type=T.int_in(0, 10**15, floats=True),
        metavar="N",
        help="linear warmup over N tokens instead of 5%% of the run",
    )
    p.add_argument("--beta2", type=T.fraction, help="AdamW beta2 (default 0.95)")
    p.add_argument(
        "--eval-tokens",
        type=T.int_in(1, 10**12, floats=True),
        metavar="N",
        help="held-out tokens per evaluation (default 32768)",
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument(
        "--nproc",
        type=T.int_in(1, 4096),
        metavar="N",
        help="train with N processes on this machine (starts torchrun; one GPU each on CUDA)",
    )
    p.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        help="with several processes: ddp replicates the model, fsdp shards it (FSDP2) (default ddp)",
    )
    p.add_argument(
        "--moe-dispatch",
        choices=("auto", "fused_loop", "grouped_mm", "padded_bmm", "loop"),
        default="auto",
        help="how routed experts run (default auto: fused_loop on CPU, torch._grouped_mm on CUDA)",
    )
    p.add_argument(
        "--threads",
        type=T.threads,
        metavar="N",
        help="CPU threads for torch ops (default: 1 for models under 10M parameters, whose ops are too small to "
        "split, else torch's default)",
    )
    add_log_flag(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (progress bar off)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(run=run)


def _fail(msg: str, code: int, rank: int | None = None) -> int:
    where = f"rank {rank}: " if rank is not None else ""
    print(f"moeforge train: {where}{msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    if check_log_flag("train", args.log):  # before torchrun starts anything
        from moeforge.cli import EXIT_BAD_INPUT

        return EXIT_BAD_INPUT
    if args.nproc is not None and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        import torch

        from moeforge.cli import EXIT_BAD_INPUT

        cuda = (args.device or "auto").startswith("cuda") or (
            args.device in (None, "auto") and torch.cuda.is_available()
        )
        n_gpus = torch.cuda.device_count()
        if cuda and n_gpus < args.nproc:
            fix = f"use --nproc {n_gpus} or --device cpu" if n_gpus else "use --device cpu"
            return _fail(
                f"--nproc {args.nproc} runs one process per GPU, and this machine has {n_gpus}; {fix}",
                EXIT_BAD_INPUT,
            )
        return launch(args.nproc, args.argv)
    from moeforge.runtime import close_distributed

    try:
        return _run(args)
    finally:
        close_distributed()  # leave the process group (a no-op for one process)


def launch(nproc: int, argv: list[str]) -> int:
    """Run this command again in `nproc` processes on this machine with torchrun (torch.distributed.run);
    the exit status is the first failing process's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    from moeforge.cli import EXIT_FAIL

    rest, skip = [], False
    for a in argv:  # the same command without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    from moeforge.runtime import torchrun_args

    # not torchrun's -m: that would put the working directory first on the children's path
    torch_args = get_args_parser().parse_args(torchrun_args(nproc, "moeforge", *rest))
    try:
        torchrun(torch_args)
    except ChildFailedError as e:
        first = min(e.failures.values(), key=lambda f: f.timestamp)
        return first.exitcode if first.exitcode > 0 else EXIT_FAIL
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from moeforge.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FAIL, EXIT_OOM
    from moeforge.compiler import account, build, load_spec, materialize, spec_to_yaml
    from moeforge.runtime import (
        DataError,
        Diverged,
        OutOfMemory,
        PeerFailed,
        TrainConfig,
        budget_problem,
        check_shapes,
        init_distributed,
        load_corpus,
        planned_tokens,
        resolve_device,
        stop_on_sigterm,
        train,
        world_from_env,
    )

    # several processes (torchrun): errors every rank meets alike are printed by rank 0 only
    main = int(os.environ.get("RANK", "0")) == 0
    rank = int(os.environ["RANK"]) if world_from_env() > 1 else None

    def fail(msg: str, code: int, everywhere: bool = False) -> int:
        if main or everywhere:
            _fail(msg, code, rank)
        return code

    given = {k: getattr(args, k) for k in _CFG_FLAGS + _BUDGET_FLAGS if getattr(args, k) is not None}
    if args.resume:
        out = (
            Path(args.out)
            if args.out
            else (Path(args.spec) if args.spec and Path(args.spec).is_dir() else None)
        )
        if out is None:
            return fail("--resume needs the run dir: --out DIR (or the run dir as SPEC)", EXIT_BAD_INPUT)
        if not (out / SPEC_FILE).is_file() or not (out / TRAIN_CONFIG_FILE).is_file():
            return fail(f"{out}: not a run dir (no {SPEC_FILE} and {TRAIN_CONFIG_FILE})", EXIT_BAD_INPUT)
        if args.overrides:
            return fail("--set cannot change the model of a run being resumed", EXIT_BAD_INPUT)
        spec = load_spec(out / SPEC_FILE)
        saved = json.loads((out / TRAIN_CONFIG_FILE).read_text())
        cfg_dict: dict[str, Any] = dict(saved["config"])
        for flag, now, was in (
            ("--data", args.data, saved.get("data")),
            ("--seed", args.seed, cfg_dict.get("seed", 0)),
        ):
            if now is not None and now != was:
                return fail(
                    f"{out} trained with {flag} {was if was is not None else '(the bundled corpus)'}; "
                    f"resuming with {flag} {now} would change the run: drop {flag}, or start a new --out",
                    EXIT_BAD_INPUT,
                )
        if any(k in given for k in _BUDGET_FLAGS):
            for k in _BUDGET_FLAGS:
                cfg_dict[k] = None
        cfg_dict.update(given)
        data = saved.get("data")
    else:
        if not args.spec:
            return fail("give a SPEC (a YAML path or a shipped name)", EXIT_BAD_INPUT)
        spec = load_spec(args.spec, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "summary.json").exists() or (out / "checkpoint").exists():
            return fail(
                f"{out} already holds a run; continue it with --resume or choose another --out",
                EXIT_BAD_INPUT,
            )
        if not any(k in given for k in _BUDGET_FLAGS):
            return fail("give a budget: --budget-flops C, --tokens N, --steps N or --time S", EXIT_BAD_INPUT)
        cfg_dict = given
        data = args.data
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
        device = resolve_device(cfg.device)
        # a budget too small to train (see runtime MIN_STEPS) is refused before anything is built
        too_small = (
            budget_problem(cfg, spec.seq_len, account(spec).train_flops_per_token)
            if any(k in given for k in _BUDGET_FLAGS)
            else None
        )
    except ValueError as e:
        return fail(str(e), EXIT_BAD_INPUT)
    if too_small:
        flag = "--budget-flops" if cfg.budget_flops is not None else "--tokens"
        return fail(f"{flag} {too_small}", EXIT_BAD_INPUT)
    d = init_distributed(cfg.device)
    stop_on_sigterm(d)
    out = Path(str(d.broadcast(str(out))))  # rank 0's name (a default name holds the time)

    acc = account(spec)
    try:
        corpus = load_corpus(data, vocab_size=spec.vocab_size)
    except DataError as e:
        return fail(str(e), EXIT_FAIL)
    if data is not None and not args.json and d.main:
        print(
            data_line(corpus, acc.params_total, planned_tokens(cfg, spec.seq_len, acc.train_flops_per_token)),
            file=sys.stderr,
        )
    # nothing is allocated until the checkpoint (if any) is known to fit the model
    model = build(spec, device="meta")
    if args.resume:
        try:
            check_shapes(out, model)
        except (FileNotFoundError, ValueError) as e:
            return fail(str(e), EXIT_BAD_INPUT)
    set_cpu_threads(args.threads, model)
    try:
        materialize(model, spec, device, seed=cfg.seed)
    except torch.OutOfMemoryError:
        return fail(f"out of memory on {device} allocating the model", EXIT_OOM, everywhere=True)
    for _, moe in model.moe_layers():
        moe.experts.dispatch = args.moe_dispatch
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (out / SPEC_FILE).write_text(spec_to_yaml(spec))
        config = {"config": cfg.to_dict(), **data_record(data, corpus)}
        (out / TRAIN_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    try:
        summary = train(
            model,
            seq_len=spec.seq_len,
            train_flops_per_token=acc.train_flops_per_token,
            corpus=corpus,
            cfg=cfg,
            out_dir=out,
            resume=args.resume,
            progress=not (args.json or args.no_progress),
            extra_summary={"spec": spec.name, "run_dir": str(out)},
            tracking=run_tracking(args.log, out, spec.name, out.name, {**cfg.to_dict(), "data": data}),
        )
    except Diverged as e:
        return fail(f"{e} (run dir {out})", EXIT_DIVERGED)
    except OutOfMemory as e:
        return fail(str(e), EXIT_OOM, everywhere=True)
    except DataError as e:
        return fail(str(e), EXIT_FAIL)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return fail(str(e), EXIT_BAD_INPUT)
    except PeerFailed as e:
        return _fail(str(e).removeprefix(f"rank {d.rank}: "), EXIT_FAIL, d.rank)
    except RuntimeError as e:
        if d.world == 1:
            raise
        # a collective that failed: a peer died (or timed out); say so in one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return _fail(
            f"lost another process of the run ({type(e).__name__}: {first}); its error is above",
            EXIT_FAIL,
            d.rank,
        )
    if not d.main:
        return 0
    if args.json:
        print_json(summary.to_dict())
    else:
        render(summary)
    return 0


def data_record(data: str | None, corpus) -> dict[str, Any]:
    """What train_config.json records of the data, so `eval` of the run dir finds it again: ``data`` as
    given (None: the bundled corpus), ``data_path`` absolute (the run may be evaluated from another folder),
    the corpus's name and fingerprint (equal exactly when the tokens of both splits are)."""
    bundled = data is None or data in ("bundled", "bundled:stdlib")
    return {
        "data": data,
        "data_path": None if data is None or bundled else os.path.abspath(os.path.expanduser(data)),
        "corpus": corpus.name,
        "data_fingerprint": corpus.fingerprint,
    }


def data_line(corpus, params: int, planned: int | None) -> str:
    """One line on what the data holds against the model and the budget: tokens per parameter, epochs."""
    from moeforge._format import count

    n = len(corpus.train)
    line = (
        f"data: {corpus.name} ({corpus.level}, vocabulary {corpus.min_vocab_size:,}): {count(n)} training "
        f"tokens, {n / params:.2f} per parameter"
    )
    if planned is None:
        return line
    epochs = planned / n
    line += f"; the budget trains {count(planned)} tokens = {epochs:.2f} epochs"
    return line + (" (repeats the data)" if epochs > 1 else "")


def set_cpu_threads(threads: int | None, model) -> None:
    """torch's intra-op threads: as asked, else 1 for small models. A tiny model's ops take microseconds, so
    splitting them only adds synchronization; on a busy machine a second thread that is descheduled stalls
    every op (measured: 1 thread trains the debug model ~15x faster than 2 on a shared 2-core machine)."""
    import torch

    if threads is None and sum(p.numel() for p in model.parameters()) < 10_000_000:
        threads = 1
    if threads is not None:
        torch.set_num_threads(max(threads, 1))


def render(s: RunSummary) -> None:
    from rich.table import Table

    from moeforge._format import count

    def f(v: Any, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    t = Table(
        title=f"[bold]{s.spec or ''}[/] -> {s.run_dir or ''}",
        title_justify="left",
        show_header=False,
    )
    t.add_column(style="dim")
    t.add_column(justify="right", style="bold")
    t.add_column(style="dim")
    t.add_row(
        "val loss",
        f"{f(s.initial_val_loss)} -> {f(s.final_val_loss)}",
        "nats per token, before -> after",
    )
    t.add_row("bits per byte", f(s.val_bits_per_byte), s.corpus)
    budget = f"budget {count(s.budget_flops)}" if s.budget_flops else "no FLOP budget"
    t.add_row("training FLOPs", count(s.train_flops), f"{budget}, {count(s.train_flops_per_token)} per token")
    t.add_row(
        "tokens",
        f"{s.tokens:,}",
        f"{s.steps:,} steps of up to {s.config['batch_size']} x {s.seq_len}",
    )
    tps = s.tokens_per_second
    t.add_row(
        "throughput",
        f"{count(tps)} tok/s" if tps else "-",
        f"{count(s.flops_per_second or 0)}FLOP/s achieved" if tps else "",
    )
    t.add_row("wall time", f"{s.wall_s:.1f} s", f"{s.train_s:.1f} s training, on {s.device}")
    load = s.load
    if load.get("layers"):
        t.add_row(
            "expert load",
            f"CV {f(load['max_cv'], '{:.3f}')}",
            f"worst layer; max/mean {f(load['max_over_mean'], '{:.2f}')}, {load['dead_experts']} dead experts",
        )
    console().print(t)
