"""moeforge import hf SRC --out DIR: a Hugging Face config (and weights) -> a moeforge spec (and state_dict)."""

from __future__ import annotations

import argparse
import sys

from . import _types as T


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="import a Hugging Face model (config.json, optional safetensors) as a spec and weights",
        description="Read a Hugging Face config.json (model_type deepseek, deepseek_v2, deepseek_v3, qwen2_moe, "
        "qwen3_moe, mixtral or olmoe) and write DIR/<name>.yaml; when SRC is a model folder with safetensors "
        "weights (sharded or not), also DIR/model.safetensors with the keys and shapes of "
        "moeforge.compiler.build(spec).state_dict(). A config field moeforge cannot express is an error that names it "
        "(exit 2). transformers is not needed.",
        epilog="examples:\n  moeforge import hf ~/models/DeepSeek-V3/config.json --out specs/imported\n"
        "  moeforge import hf ~/models/OLMoE-1B-7B --out runs/olmoe --name olmoe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", choices=("hf",), help="where the model comes from (hf: Hugging Face layout)")
    p.add_argument(
        "src", metavar="SRC", help="a config.json, or a model folder with config.json and *.safetensors"
    )
    p.add_argument(
        "--out",
        type=T.out_dir,
        required=True,
        metavar="DIR",
        help="folder for <name>.yaml and model.safetensors",
    )
    p.add_argument("--name", help="spec name (default: the model folder's name)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.compiler import HFError, import_hf

    try:
        spec_path, weights_path, notes = import_hf(args.src, args.out, args.name)
    except HFError as e:
        print(f"moeforge import: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {spec_path}")
    if weights_path is not None:
        print(f"wrote {weights_path}")
    return 0
