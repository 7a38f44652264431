"""moeforge eval SPEC --checkpoint PATH: validation loss and bits per byte of trained weights."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _types as T
from ._common import SPEC_HELP, add_overrides, console, print_json, trained_spec_mismatch
from .train import TRAIN_CONFIG_FILE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss and bits per byte of a checkpoint",
        description="Load a checkpoint's weights (safetensors, never unpickled) into the model a spec builds "
        "and evaluate it on the corpus's fixed held-out windows. A checkpoint (or SPEC) in a run dir of "
        "`moeforge train` is evaluated on the data that run trained on (its train_config.json); another "
        "--data is used, with a note.",
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
        "--data",
        metavar="PATH",
        help="`bundled`, a dataset folder of `moeforge data prepare`, text file/folder, .bin token file(s); "
        "default the data of the run dir, else the bundled corpus",
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
    run = run_data(Path(args.checkpoint), spec_path)
    try:
        corpus = load_corpus(args.data if args.data is not None else run.source, vocab_size=spec.vocab_size)
        note = run.note(corpus, args.data)
        if note:
            print(f"moeforge eval: note: {note}", file=sys.stderr)
        res = evaluate(model, corpus, spec.seq_len, args.batch_size, args.eval_tokens, args.device)
    except DataError as e:
        return _fail(str(e), EXIT_FAIL)
    except OutOfMemory as e:
        return _fail(str(e), EXIT_OOM)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    res = {
        "spec": spec.name,
        "checkpoint": str(args.checkpoint),
        "corpus": corpus.name,
        "data_fingerprint": corpus.fingerprint,
        "run_data": run.fingerprint is not None and run.fingerprint == corpus.fingerprint,
        **res,
    }
    if args.json:
        print_json(res)
    else:
        bpb = res["val_bits_per_byte"]
        console().print(
            f"[bold]{spec.name}[/] val loss [bold]{res['val_loss']:.4f}[/] nats/token, "
            f"bits per byte [bold]{'-' if bpb is None else f'{bpb:.4f}'}[/] on {corpus.name}"
        )
    return 0


@dataclass(frozen=True)
class RunData:
    """The data a run dir recorded in train_config.json (nothing when there is no run dir)."""

    run_dir: Path | None = None
    source: str | None = None
    """What to load: the absolute path recorded, else the path as given; None is the bundled corpus."""
    corpus: str | None = None
    fingerprint: str | None = None

    def note(self, corpus: Any, given: str | None) -> str | None:
        """One line when `corpus` is not the data the run trained on: asked for (--data `given`), or changed
        since."""
        if self.run_dir is None:
            return None
        if self.fingerprint is not None:
            same = corpus.fingerprint == self.fingerprint
        else:  # a run dir from before fingerprints were recorded: compare the paths
            same = given is None or _normal(given) == _normal(self.source)
        if same:
            return None
        trained = self.corpus or self.source or "the bundled corpus"
        if given is not None:
            return (
                f"evaluating on {corpus.name} (fingerprint {corpus.fingerprint}), not the data {self.run_dir} "
                f"trained on ({trained}, fingerprint {self.fingerprint or 'not recorded'})"
            )
        return (
            f"the data {self.run_dir} trained on ({trained}) has changed since: fingerprint "
            f"{corpus.fingerprint}, trained on {self.fingerprint}"
        )


def _normal(source: str | None) -> str | None:
    if source is None or source in ("bundled", "bundled:stdlib"):
        return None
    return os.path.abspath(os.path.expanduser(source))


def find_run_dir(*paths: Path) -> Path | None:
    """The run dir (one with train_config.json) that holds any of `paths`: the dir itself, its checkpoint/
    folder, or a file in that folder."""
    for path in paths:
        for p in (path, path.parent, path.parent.parent):
            if (p / TRAIN_CONFIG_FILE).is_file():
                return p
    return None


def run_data(checkpoint: Path, spec: Path) -> RunData:
    """The data recorded by the run dir that holds `checkpoint` (else `spec`); empty when there is none or
    its train_config.json cannot be read."""
    run_dir = find_run_dir(checkpoint, spec)
    if run_dir is None:
        return RunData()
    try:
        saved = json.loads((run_dir / TRAIN_CONFIG_FILE).read_text())
        data, path = saved.get("data"), saved.get("data_path")
        source = path if path is not None and Path(path).exists() else data
        return RunData(run_dir, source, saved.get("corpus"), saved.get("data_fingerprint"))
    except (OSError, ValueError, AttributeError):
        return RunData()
