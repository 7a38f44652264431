"""moeforge train SPEC: train a spec on a corpus within a compute budget, into a run dir."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ._common import SPEC_HELP, add_overrides, console, print_json

TRAIN_CONFIG_FILE = "train_config.json"
SPEC_FILE = "spec.yaml"
# flags that, when given with --resume, replace what the run dir recorded
_CFG_FLAGS = ("seed", "batch_size", "micro_batch_size", "lr", "schedule", "device", "compile", "eval_tokens")
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
        "  moeforge train my.yaml --tokens 5e6 --data corpus.txt --set moe.top_k=4 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec", nargs="?", metavar="SPEC", help=SPEC_HELP + "; with --resume, optional (or the run dir)"
    )
    add_overrides(p)
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget-flops", type=float, metavar="C", help="training FLOPs (e.g. 2e12)")
    b.add_argument("--tokens", type=lambda s: int(float(s)), metavar="N", help="training tokens")
    b.add_argument("--steps", type=int, metavar="N", help="optimizer steps")
    p.add_argument(
        "--time",
        dest="time_s",
        type=float,
        metavar="S",
        help="wall-clock limit in seconds (alone or as a cap)",
    )
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="a dataset folder of `moeforge data prepare`, text file/folder, .bin token file(s); default the "
        "bundled corpus",
    )
    p.add_argument("--out", metavar="DIR", help="run dir (default runs/<spec-name>-<timestamp>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (or SPEC as run dir), also to a larger budget",
    )
    p.add_argument("--seed", type=int, help="data order and initialization seed (default 0)")
    p.add_argument("--batch-size", type=int, metavar="B", help="sequences per step (default 16)")
    p.add_argument("--micro-batch-size", type=int, metavar="M", help="gradient accumulation micro batch")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--schedule", choices=("cosine", "wsd"), help="learning-rate schedule (default cosine)")
    p.add_argument(
        "--eval-tokens", type=int, metavar="N", help="held-out tokens per evaluation (default 32768)"
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument(
        "--moe-dispatch",
        choices=("auto", "fused_loop", "grouped_mm", "padded_bmm", "loop"),
        default="auto",
        help="how routed experts run (default auto: fused_loop on CPU, torch._grouped_mm on CUDA)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch ops (default: 1 for models under 10M parameters, whose ops are too small to "
        "split, else torch's default)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON (progress bar off)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(run=run)


def _fail(msg: str, code: int) -> int:
    print(f"moeforge train: {msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FAIL, EXIT_OOM
    from moeforge.compiler import account, build, load_spec, spec_to_yaml
    from moeforge.runtime import (
        DataError,
        Diverged,
        OutOfMemory,
        TrainConfig,
        load_corpus,
        planned_tokens,
        train,
    )

    given = {k: getattr(args, k) for k in _CFG_FLAGS + _BUDGET_FLAGS if getattr(args, k) is not None}
    if args.resume:
        out = (
            Path(args.out)
            if args.out
            else (Path(args.spec) if args.spec and Path(args.spec).is_dir() else None)
        )
        if out is None:
            return _fail("--resume needs the run dir: --out DIR (or the run dir as SPEC)", EXIT_BAD_INPUT)
        if not (out / SPEC_FILE).is_file() or not (out / TRAIN_CONFIG_FILE).is_file():
            return _fail(f"{out}: not a run dir (no {SPEC_FILE} and {TRAIN_CONFIG_FILE})", EXIT_BAD_INPUT)
        if args.overrides:
            return _fail("--set cannot change the model of a run being resumed", EXIT_BAD_INPUT)
        spec = load_spec(out / SPEC_FILE)
        saved = json.loads((out / TRAIN_CONFIG_FILE).read_text())
        cfg_dict: dict[str, Any] = dict(saved["config"])
        if any(k in given for k in _BUDGET_FLAGS):
            for k in _BUDGET_FLAGS:
                cfg_dict[k] = None
        cfg_dict.update(given)
        data = args.data if args.data is not None else saved.get("data")
    else:
        if not args.spec:
            return _fail("give a SPEC (a YAML path or a shipped name)", EXIT_BAD_INPUT)
        spec = load_spec(args.spec, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "summary.json").exists() or (out / "checkpoint").exists():
            return _fail(
                f"{out} already holds a run; continue it with --resume or choose another --out",
                EXIT_BAD_INPUT,
            )
        if not any(k in given for k in _BUDGET_FLAGS):
            return _fail("give a budget: --budget-flops C, --tokens N, --steps N or --time S", EXIT_BAD_INPUT)
        cfg_dict = given
        data = args.data
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)

    acc = account(spec)
    try:
        corpus = load_corpus(data, vocab_size=spec.vocab_size)
    except DataError as e:
        return _fail(str(e), EXIT_FAIL)
    if data is not None and not args.json:
        print(
            data_line(corpus, acc.params_total, planned_tokens(cfg, spec.seq_len, acc.train_flops_per_token)),
            file=sys.stderr,
        )
    model = build(spec, seed=cfg.seed)
    for _, moe in model.moe_layers():
        moe.experts.dispatch = args.moe_dispatch
    set_cpu_threads(args.threads, model)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (out / SPEC_FILE).write_text(spec_to_yaml(spec))
    (out / TRAIN_CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict(), "data": data}, indent=2) + "\n")
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
        )
    except Diverged as e:
        return _fail(f"{e} (run dir {out})", EXIT_DIVERGED)
    except OutOfMemory as e:
        return _fail(str(e), EXIT_OOM)
    except DataError as e:
        return _fail(str(e), EXIT_FAIL)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    if args.json:
        print_json(summary)
    else:
        render(summary)
    return 0


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


def render(s: dict[str, Any]) -> None:
    from rich.table import Table

    from moeforge._format import count

    def f(v: Any, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    t = Table(
        title=f"[bold]{s.get('spec', '')}[/] -> {s.get('run_dir', '')}",
        title_justify="left",
        show_header=False,
    )
    t.add_column(style="dim")
    t.add_column(justify="right", style="bold")
    t.add_column(style="dim")
    t.add_row(
        "val loss",
        f"{f(s['initial_val_loss'])} -> {f(s['final_val_loss'])}",
        "nats per token, before -> after",
    )
    t.add_row("bits per byte", f(s["val_bits_per_byte"]), s["corpus"])
    budget = f"budget {count(s['budget_flops'])}" if s["budget_flops"] else "no FLOP budget"
    t.add_row(
        "training FLOPs", count(s["train_flops"]), f"{budget}, {count(s['train_flops_per_token'])} per token"
    )
    t.add_row(
        "tokens",
        f"{s['tokens']:,}",
        f"{s['steps']:,} steps of up to {s['config']['batch_size']} x {s['seq_len']}",
    )
    tps = s["tokens_per_second"]
    t.add_row(
        "throughput",
        f"{count(tps)} tok/s" if tps else "-",
        f"{count(s['flops_per_second'])}FLOP/s achieved" if tps else "",
    )
    t.add_row("wall time", f"{s['wall_s']:.1f} s", f"{s['train_s']:.1f} s training, on {s['device']}")
    load = s.get("load", {})
    if load.get("layers"):
        t.add_row(
            "expert load",
            f"CV {f(load['max_cv'], '{:.3f}')}",
            f"worst layer; max/mean {f(load['max_over_mean'], '{:.2f}')}, {load['dead_experts']} dead experts",
        )
    console().print(t)
