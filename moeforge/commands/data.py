"""moeforge data prepare SRC... --out DIR: tokenize text once into memory-mappable token shards."""

from __future__ import annotations

import argparse
import sys

from . import _types as T
from ._common import console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="prepare a dataset: sources + a tokenizer -> token shards and meta.json",
        description="Datasets for `moeforge train --data DIR` and a search's `train.data: DIR`.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = dsub.add_parser(
        "prepare",
        help="tokenize sources into DIR/train/*.bin, DIR/val/*.bin and DIR/meta.json",
        description="Tokenize SRC (text files, folders of them, JSON lines, parquet, `bundled` for the Python "
        "standard library's sources, Hugging Face dataset names or save_to_disk folders) into token shards, "
        "documents separated by the tokenizer's end-of-text token, validation chosen by document. Run it "
        "again with the same arguments to continue a stopped prepare; finished shards are kept. "
        "Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted.",
        epilog="examples:\n"
        "  moeforge data prepare bundled --train-tokenizer 1024 --out data/stdlib-bpe1k\n"
        "  moeforge data prepare corpus/ --tokenizer bytes --out data/corpus-bytes\n"
        "  moeforge data prepare train.jsonl more.parquet --text-field content --tokenizer gpt2/ --out data/mix\n"
        "  moeforge data prepare HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer tok.json --out data/fw  "
        "(needs moeforge[data])",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("sources", nargs="+", metavar="SRC", help="sources, concatenated in order")
    t = q.add_mutually_exclusive_group()
    t.add_argument(
        "--tokenizer",
        metavar="TOK",
        default="bytes",
        help="bytes (default; end-of-text is byte 0), a tokenizer.json, or a folder holding one",
    )
    t.add_argument(
        "--train-tokenizer",
        type=T.int_in(257, 2**20),
        metavar="V",
        help="train a byte-level BPE of vocabulary V on the train split; saved as DIR/tokenizer.json",
    )
    q.add_argument("--out", type=T.out_dir, required=True, metavar="DIR", help="the dataset folder")
    q.add_argument("--text-field", default="text", help="JSON-lines field / parquet column (default text)")
    q.add_argument(
        "--val-fraction",
        type=T.fraction,
        default=0.05,
        help="fraction of documents for validation (default 0.05)",
    )
    q.add_argument("--seed", type=T.seed, default=0, help="which documents are validation (default 0)")
    q.add_argument(
        "--workers", type=T.int_in(1, 1024), metavar="N", help="tokenizing processes (default: every CPU)"
    )
    q.add_argument(
        "--shard-tokens",
        type=T.int_in(1, 2**31 - 1, floats=True),
        default=100_000_000,
        metavar="N",
        help="tokens per shard (default 1e8)",
    )
    q.add_argument("--eot", metavar="TOKEN", help="the end-of-text token, when not a usual name")
    q.add_argument("--json", action="store_true", help="print meta.json's summary as JSON (progress bar off)")
    q.add_argument("--no-progress", action="store_true", help="no live progress bar")
    q.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from moeforge.cli import EXIT_BAD_INPUT
    from moeforge.runtime import DataError, prepare_data

    quiet = args.json or args.no_progress
    try:
        meta = prepare_data(
            args.sources,
            args.out,
            tokenizer=args.tokenizer,
            train_vocab=args.train_tokenizer,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            seed=args.seed,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            eot=args.eot,
            progress=not quiet,
            log=None if args.json else (lambda msg: print(msg, file=sys.stderr)),
        )
    except DataError as e:
        print(f"moeforge data prepare: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary = {k: v for k, v in meta.items() if k not in ("splits", "config")}
    summary["splits"] = {s: {k: v for k, v in d.items() if k != "shards"} for s, d in meta["splits"].items()}
    summary["out"] = args.out
    if args.json:
        print_json(summary)
    else:
        render(summary)
    return 0


def render(s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"[bold]{s['out']}[/]", title_justify="left", show_header=False)
    t.add_column(style="dim")
    t.add_column(justify="right", style="bold")
    t.add_column(style="dim")
    tok = s["tokenizer"]
    t.add_row(
        "tokenizer",
        tok["name"],
        f"vocabulary {tok['vocab_size']:,}, end-of-text {tok['eot']!r}, {s['dtype']}",
    )
    for split in ("train", "val"):
        d = s["splits"][split]
        t.add_row(
            split, f"{d['tokens']:,} tokens", f"{d['documents']:,} documents, {d['bytes'] / 1e6:.1f} MB"
        )
    t.add_row("bytes per token", f"{s['bytes_per_token']:.3f}", "measured on the validation split")
    t.add_row("fingerprint", s["fingerprint"], "what a search compares")
    console().print(t)
