"""`moeforge`: validate, report and compare specs; train models; search architectures.

Each subcommand lives in `moeforge/commands/<name>.py` with `register(subparsers)`; heavy imports happen
inside the command, so `moeforge --help` is instant. Exit status: 0 ok, 1 failure, 2 bad input (a spec
error, a usage error), 3 training diverged, 4 out of memory, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from moeforge import __version__

COMMANDS = (
    "list_",
    "validate",
    "report",
    "compare",
    "schema",
    "train",
    "eval",
    "search",
    "scaling",
    "data",
    "import_",
    "export",
)

EPILOG = """\
examples:
  moeforge list                                    the shipped model and search specs, one line each
  moeforge report deepseekmoe-16b                  parameters and FLOPs of a shipped spec
  moeforge report my.yaml --by layer --json        per-layer counts for tools
  moeforge compare gshard-2b deepseekmoe-2b        side by side
  moeforge validate specs/models/*.yaml            check specs (exit 2 on problems)
  moeforge train debug --budget-flops 2e12         train on the bundled corpus
  moeforge search quickstart                       budget-constrained architecture search
  moeforge scaling fit runs/ladder --out fit/      scaling law of a search's runs; then `scaling predict`
  moeforge data prepare bundled --train-tokenizer 1024 --out data/bpe1k   tokenize once into shards

Shipped specs can be named without a path; `moeforge schema` prints the JSON Schema of specs.
"""

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class Parser(argparse.ArgumentParser):
    """Usage errors are one line, ``moeforge train: --lr: must be a finite number > 0 (got 'inf')``, exit 2
    (argparse's default prints the whole usage first). Subcommands' parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moeforge",
        description="YAML specs of DeepSeekMoE-style Mixture-of-Experts models: validate, count, train, search.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moeforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"moeforge.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"moeforge.commands.{name}":
                raise
            continue  # a command not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, a usage error: a status, so in-process callers see it too
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` starts torchrun with it
    from moeforge.compiler import SpecError

    try:
        return int(args.run(args) or 0)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # a file where a folder goes (or the reverse), a folder not writable: the user's to fix
        print(f"{parser.prog} {args.command}: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
