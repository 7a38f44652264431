"""moeforge export hf SPEC [--checkpoint PATH] --out DIR: a spec (and weights) as a Hugging Face model folder."""

from __future__ import annotations

import argparse
import sys

from ._common import SPEC_HELP, add_overrides, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a spec (and a checkpoint's weights) as a config.json transformers loads",
        description="Write DIR/config.json for the first family (deepseek_v3, deepseek_v2, qwen2_moe, qwen3_moe, "
        "olmoe, mixtral, deepseek) whose transformers implementation computes exactly what the spec describes, "
        "or for --family; a spec no family expresses is an error naming the field (exit 2). With --checkpoint "
        "(our model.safetensors, or a folder holding one) also DIR/model.safetensors in the Hub's per-expert "
        "layout. --check loads the result with transformers and compares parameters and logits.",
        epilog="examples:\n  moeforge export hf specs/models/deepseek-v3.yaml --out /tmp/v3\n"
        "  moeforge export hf my.yaml --checkpoint runs/x --out /tmp/x --check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", choices=("hf",), help="the layout to write (hf: Hugging Face)")
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    add_overrides(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for config.json and model.safetensors")
    p.add_argument(
        "--checkpoint", metavar="PATH", help="weights: our model.safetensors or a folder holding one"
    )
    p.add_argument("--family", help="model_type to write (default: the first that expresses the spec)")
    p.add_argument(
        "--check", action="store_true", help="load with transformers and compare (needs transformers)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.compiler import HFError, check_against_transformers, export_hf, load_spec

    spec = load_spec(args.spec, args.overrides)
    try:
        config_path, weights_path = export_hf(spec, args.out, args.checkpoint, args.family)
    except HFError as e:
        print(f"moeforge export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {config_path}")
    if weights_path is not None:
        print(f"wrote {weights_path}")
    if args.check:
        try:
            result = check_against_transformers(spec, args.out)
        except ImportError:
            print("moeforge export: --check needs transformers (pip install transformers)", file=sys.stderr)
            return 1
        except (ValueError, KeyError) as e:
            print(f"moeforge export: transformers cannot load {args.out}: {e}", file=sys.stderr)
            return 1
        print_json(result)
        if (
            result["params_ours"] != result["params_transformers"]
            or result.get("max_rel_logit_diff", 0) > 1e-5
        ):
            return 1
    return 0
