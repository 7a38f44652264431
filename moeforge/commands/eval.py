"""moeforge eval SPEC --checkpoint PATH: validation loss and bits per byte of trained weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _types as T
from ._common import SPEC_HELP, add_overrides, console, print_json, trained_spec_mismatch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss and bits per byte of a checkpoint",
        description="Load a checkpoint's weights (safetensors, never unpickled) into the model a spec builds "
        "and evaluate it on the corpus's fixed held-out windows.",
        epilog="examples:\n  moeforge eval debug --checkpoint runs/dbg\n"
        "  moeforge eval runs/dbg/spec.yaml --checkpoint runs/dbg/checkpoint/model.safetensors --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP + ", or a run dir (its spec.yaml)")
    add_overrides(p)
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="run dir, checkpoint dir or model.safetensors"
    )
    p.add_argument(
        "--data", metavar="PATH", help="text file/folder, .bin token file(s); default the bundled corpus"
    )
    p.add_argument(
        "--device", type=T.device, default="auto", help="auto | cpu | cuda | cuda:N (default auto)"
    )
    p.add_argument(
        "--eval-tokens",
        type=T.int_in(1, 10**12, floats=True),
        default=32768,
        metavar="N",
        help="held-out tokens (default 32768)",
    )
    p.add_argument(
        "--batch-size",
        type=T.int_in(1, 2**20),
        default=16,
        metavar="B",
        help="sequences per batch (default 16)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _fail(msg: str, code: int) -> int:
    print(f"moeforge eval: {msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OOM
    from moeforge.compiler import build, load_spec, materialize
    from moeforge.runtime import (
        DataError,
        OutOfMemory,
        check_shapes,
        evaluate,
        load_corpus,
        load_weights,
        resolve_device,
    )

    spec_path = Path(args.spec)
    spec = load_spec(spec_path / "spec.yaml" if spec_path.is_dir() else args.spec, args.overrides)
    from .train import set_cpu_threads

    if args.eval_tokens < spec.seq_len:
        return _fail(
            f"--eval-tokens: {args.eval_tokens} is less than one sequence of {spec.name} ({spec.seq_len} tokens)",
            EXIT_BAD_INPUT,
        )

    # the checkpoint's header is checked against a model on the meta device: nothing is allocated for a
    # checkpoint that does not fit
    model = build(spec, device="meta")
    try:
        device = resolve_device(args.device)
        check_shapes(Path(args.checkpoint), model)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except Exception as e:  # safetensors reports a corrupt file with its own error types
        return _fail(f"{args.checkpoint}: cannot read checkpoint ({type(e).__name__}: {e})", EXIT_FAIL)
    mismatch = trained_spec_mismatch(spec, args.checkpoint)  # the same shapes can be another model
    if mismatch:
        return _fail(mismatch, EXIT_BAD_INPUT)
    set_cpu_threads(None, model)
    materialize(model, spec, device)
    try:
        load_weights(Path(args.checkpoint), model)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except Exception as e:  # safetensors reports a corrupt file with its own error types
        return _fail(f"{args.checkpoint}: cannot read checkpoint ({type(e).__name__}: {e})", EXIT_FAIL)
    try:
        corpus = load_corpus(args.data, vocab_size=spec.vocab_size)
        res = evaluate(model, corpus, spec.seq_len, args.batch_size, args.eval_tokens, args.device)
    except DataError as e:
        return _fail(str(e), EXIT_FAIL)
    except OutOfMemory as e:
        return _fail(str(e), EXIT_OOM)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    res = {"spec": spec.name, "checkpoint": str(args.checkpoint), "corpus": corpus.name, **res}
    if args.json:
        print_json(res)
    else:
        bpb = res["val_bits_per_byte"]
        console().print(
            f"[bold]{spec.name}[/] val loss [bold]{res['val_loss']:.4f}[/] nats/token, "
            f"bits per byte [bold]{'-' if bpb is None else f'{bpb:.4f}'}[/] on {corpus.name}"
        )
    return 0
