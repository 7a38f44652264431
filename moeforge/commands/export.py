"""moeforge export hf SPEC|RUN_DIR [--trial N] --out DIR: a spec, or a search's winner with its trained weights,
as a Hugging Face model folder that a stock transformers class loads."""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

from . import _types as T
from ._common import SPEC_HELP, add_overrides, print_json, trained_spec_mismatch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a spec or a search winner (with its weights) as a model transformers loads",
        description="Write DIR/config.json and DIR/README.md (a model card) for the first stock transformers "
        "class (deepseek_v3, deepseek_v2, glm4_moe, qwen3_moe, olmoe, mixtral, qwen2_moe; dense specs: llama, "
        "qwen2, qwen3) that computes exactly what the spec describes, or for --format; the remote-code `deepseek` format is written only when named. A spec "
        "no stock class expresses is an error naming the feature (exit 2). Given a search run dir, export its "
        "best trial (or --trial N): that trial's spec and trained weights, and the search's evidence in the "
        "card. With --checkpoint (our model.safetensors, or a folder holding one) also DIR/model.safetensors. "
        "--check loads the result with transformers (no remote code), compares parameters and logits and "
        "prints PASS or FAIL (exit 1 on FAIL); it needs transformers: pip install 'moeforge[hf]'.",
        epilog="examples:\n  moeforge export hf runs/quickstart --out exported --check\n"
        "  moeforge export hf runs/quickstart --trial 3 --out trial3\n"
        "  moeforge export hf debug --format qwen2_moe --out /tmp/debug\n"
        "  moeforge export hf my.yaml --checkpoint runs/x --out /tmp/x --check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", choices=("hf",), help="the layout to write (hf: Hugging Face)")
    p.add_argument("spec", metavar="SPEC|RUN_DIR", help=SPEC_HELP + "; or a search run dir")
    add_overrides(p)
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for config.json, weights and README.md"
    )
    p.add_argument(
        "--checkpoint", metavar="PATH", help="weights: our model.safetensors or a folder holding one"
    )
    p.add_argument(
        "--trial", type=T.int_in(0, 10**9), metavar="N", help="with a run dir: this trial instead of the best"
    )
    p.add_argument(
        "--format",
        "--family",
        dest="format",
        default="auto",
        metavar="FORMAT",
        help="model_type to write: auto (default: the first stock class that is exact), or one of "
        "deepseek_v3, deepseek_v2, glm4_moe, qwen3_moe, olmoe, mixtral, qwen2_moe, llama, qwen2, qwen3, "
        "deepseek (remote code)",
    )
    p.add_argument("--force", action="store_true", help="overwrite DIR even if it holds another model")
    p.add_argument(
        "--check",
        action="store_true",
        help="load with transformers and compare (needs transformers: pip install 'moeforge[hf]')",
    )
    p.add_argument(
        "--json", action="store_true", help="with --check: print the check's raw record as JSON (stdout)"
    )
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"moeforge export: {message}", file=sys.stderr)
    return 2


# The transformers release --check needs: every family's logits match from 5.15 (the `hf` extra's floor).
TRANSFORMERS_FLOOR = (5, 15)
# check_passes' relative logit tolerance (fp32, eager attention on both sides).
TOLERANCE = 1e-5


def _transformers_problem() -> str | None:
    """Why --check cannot run here (transformers missing or too old), checked before anything is written."""
    hint = "pip install 'moeforge[hf]'"
    try:
        import transformers
    except ImportError:
        return f"--check: needs transformers, which is not installed; {hint}"
    version = str(getattr(transformers, "__version__", "0"))
    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if parts < TRANSFORMERS_FLOOR:
        floor = ".".join(map(str, TRANSFORMERS_FLOOR))
        return f"--check: needs transformers >= {floor}, found {version}; {hint}"
    return None


def run(args: argparse.Namespace) -> int:
    from moeforge.compiler import HFError, choose_format, export_hf, load_spec, model_card

    if args.json and not args.check:
        return _fail("--json: prints the --check record; add --check")
    if args.check:
        problem = _transformers_problem()
        if problem:
            return _fail(problem)
    evidence: dict[str, Any] | None = None
    corpus: str | None = None
    checkpoint = args.checkpoint
    try:
        if Path(args.spec).is_dir():
            if args.overrides:
                return _fail("--set changes a spec; a run dir's trial is exported as it was trained")
            if checkpoint is not None:
                return _fail("--checkpoint: a run dir's trial brings its own checkpoint")
            spec, checkpoint, evidence, corpus = _from_run(Path(args.spec), args.trial)
        else:
            if args.trial is not None:
                return _fail(f"--trial: {args.spec} is not a search run dir")
            spec = load_spec(args.spec, args.overrides)
            mismatch = checkpoint and trained_spec_mismatch(spec, checkpoint)
            if mismatch:
                return _fail(mismatch)
        fmt = choose_format(spec, args.format)
        card = model_card(spec, fmt, evidence)
        config_path, weights_path = export_hf(spec, args.out, checkpoint, fmt, card=card, force=args.force)
    except HFError as e:
        return _fail(str(e))
    say = partial(print, file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the JSON only
    say(f"format: {fmt}" + (" (remote code)" if fmt == "deepseek" else " (stock transformers class)"))
    if evidence:
        say(f"trial {evidence['trial']} of {args.spec}, {evidence['metric']} {evidence['value']:.4f}")
    say(f"wrote {config_path}")
    if weights_path is not None:
        say(f"wrote {weights_path}")
    say(f"wrote {Path(args.out) / 'README.md'}")
    return _check(spec, args.out, corpus, args.json) if args.check else 0


def _check(spec, out: str, corpus: str | None, as_json: bool) -> int:
    from moeforge.compiler import check_against_transformers, check_passes

    ids, source = _held_out(spec, corpus)
    try:
        result = check_against_transformers(spec, out, ids)
    except (ValueError, KeyError, OSError) as e:
        print(f"moeforge export: transformers cannot load {out}: {e}", file=sys.stderr)
        return 1
    if "max_rel_logit_diff" in result:
        result["compared_on"] = source
    passed = check_passes(result, TOLERANCE)
    if as_json:
        print_json(result)
    else:
        print("\n".join(verdict_lines(result, out, passed)))
    return 0 if passed else 1


def verdict_lines(result: dict[str, Any], out: str, passed: bool) -> list[str]:
    """The --check record as lines a person reads: what was compared, the numbers, PASS or FAIL."""
    import transformers

    ours, theirs, added = result["params_ours"], result["params_transformers"], result["params_added"]
    expected = ours + sum(added.values())
    lines = [f"check: {out} loaded by transformers {transformers.__version__} as {result['format']}"]
    parts = ", ".join(f"{n:+,} {k}" for k, n in added.items())
    why = f", with {parts}: {expected:,}" if added else ""
    count = f"  parameters: moeforge counts {ours:,}{why}; transformers' num_parameters() gives {theirs:,}"
    ok = expected == theirs
    lines.append(count + (": equal" if ok else f": differ by {theirs - expected:+,}"))
    if "max_rel_logit_diff" in result:
        rel = result["max_rel_logit_diff"]
        lines.append(
            f"  logits: {result['compared_tokens']:,} tokens ({result.get('compared_on', 'random ids')}) through "
            f"both models in fp32: max |difference| {result['max_abs_logit_diff']:.3g}, relative "
            f"{rel:.3g} (tolerance {TOLERANCE:g}){'' if rel <= TOLERANCE else ': over'}"
        )
        lines.append(f"  transformers' greedy continuation of the first 8 tokens: {result['generated']}")
    else:
        lines.append("  logits: not compared (no weights; give --checkpoint or a run dir to compare them)")
    rel = result.get("max_rel_logit_diff", 0.0)
    failed = [("parameter counts differ", not ok), ("logits differ beyond the tolerance", rel > TOLERANCE)]
    reasons = [reason for reason, bad in failed if bad] or ["see the record (--json)"]
    lines.append("verdict: PASS" if passed else "verdict: FAIL, " + "; ".join(reasons))
    return lines


def _held_out(spec, corpus: str | None):
    """Held-out token ids to compare logits on: the corpus's validation split (byte-level specs use the
    bundled corpus when none is named); random ids when there is none to use."""
    if corpus is None and spec.vocab_size < 256:
        return None, "random ids"
    try:
        from moeforge.runtime import DataError, load_corpus

        data = load_corpus(corpus, vocab_size=spec.vocab_size)
        x, _ = data.val_batches(2, min(64, spec.seq_len), 128)[0]
    except (DataError, ValueError, OSError):
        return None, "random ids"
    return x, f"{data.name} validation split"


# ------------------------------------------------------------------------------------------ run dirs
def _from_run(run_dir: Path, number: int | None) -> tuple[Any, Path, dict[str, Any], str | None]:
    """The (spec, checkpoint folder, evidence, corpus name) of a search's best trial or of trial `number`."""
    from moeforge.compiler import HFError

    records_path = run_dir / "trials.json"
    if not records_path.is_file():
        raise HFError(f"{run_dir}: not a search run dir (no trials.json)")
    records = json.loads(records_path.read_text())
    done = [r for r in records if r.get("state") == "COMPLETE" and r.get("value") is not None]
    if number is None:
        if not done:
            raise HFError(f"{run_dir}: no completed trial to export")
        record = min(done, key=lambda r: r["value"])
    else:
        found = [r for r in records if r.get("number") == number]
        if not found:
            numbers = sorted(r["number"] for r in records)
            have = f"trials {numbers[0]}-{numbers[-1]}" if numbers else "no trials"
            raise HFError(f"--trial {number}: no such trial in {records_path} ({have})")
        record = found[0]
        if record not in done:
            ok = ", ".join(str(r["number"]) for r in done) or "none"
            raise HFError(
                f"--trial {number}: {record.get('state')}, so it has no trained weights; completed: {ok}"
            )
    info = _run_info(run_dir)
    spec = _trial_spec(run_dir, record, info, best=number is None)
    name = info.get("search", "search")
    spec = spec.model_copy(update={"name": f"{name}-trial-{record['number']}"})
    checkpoint, seeds, summary = _trial_checkpoint(run_dir, record)
    others = [
        r for r in done if r["number"] != record["number"] and r.get("trial_dir") != record.get("trial_dir")
    ]
    runner = min(others, key=lambda r: r["value"]) if others else None
    evidence: dict[str, Any] = {
        "search": name,
        "run_dir": str(run_dir),
        "trial": record["number"],
        "params": record.get("params"),
        "metric": info.get("metric", "objective"),
        "value": record["value"],
        "budget_flops": record.get("budget_flops"),
        "seeds": seeds,
        "seed_values": record.get("seed_values"),
        "tokens": record.get("tokens"),
        "initial_val_loss": record.get("initial_val_loss"),
        "val_bits_per_byte": record.get("val_bits_per_byte"),
        "corpus": summary.get("corpus"),
        "n_complete": len(done),
        "runner_up": runner
        and {"trial": runner["number"], "value": runner["value"], "params": runner.get("params")},
    }
    return spec, checkpoint, {k: v for k, v in evidence.items() if v is not None}, summary.get("corpus")


def _run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _trial_spec(run_dir: Path, record: dict[str, Any], info: dict[str, Any], best: bool):
    """The trial's spec: from trials.json when recorded there, else from the study (Optuna), else best.yaml."""
    from moeforge.compiler import HFError, ModelSpec, load_spec

    if record.get("spec"):
        return ModelSpec.model_validate(record["spec"])
    attrs = _study_trial_attrs(run_dir, info, record["number"])
    if attrs.get("spec"):
        info.setdefault("metric", attrs.get("_metric", "objective"))
        return ModelSpec.model_validate(attrs["spec"])
    if best and (run_dir / "best.yaml").is_file():
        return load_spec(run_dir / "best.yaml")
    raise HFError(f"trial {record['number']}: its spec is neither in trials.json nor in a readable study")


def _study_trial_attrs(run_dir: Path, info: dict[str, Any], number: int) -> dict[str, Any]:
    storage = info.get("storage")
    if not storage or "study" not in info:
        return {}
    try:
        import optuna

        from moeforge.search import open_storage

        url = storage if "://" in storage or Path(storage).is_absolute() else str(run_dir / storage)
        study = optuna.load_study(study_name=info["study"], storage=open_storage(url))
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        metric = (study.user_attrs.get("search") or {}).get("objective", {}).get("metric", "objective")
        return {**(trial.user_attrs if trial else {}), "_metric": metric}
    except Exception:  # noqa: BLE001 (an unreadable study only means falling back to best.yaml)
        return {}


def _trial_checkpoint(run_dir: Path, record: dict[str, Any]) -> tuple[Path, list[int], dict[str, Any]]:
    """The first seed's checkpoint folder of a trial, its seeds, and that seed's summary.json."""
    from moeforge.compiler import HFError
    from moeforge.runtime import find_checkpoint

    folder = run_dir / str(record.get("trial_dir") or "")
    seed_dirs = sorted(folder.glob("seed-*"), key=lambda p: int(p.name.split("-", 1)[1]))
    seeds = [int(p.name.split("-", 1)[1]) for p in seed_dirs]
    for seed_dir in seed_dirs:
        ckpt = find_checkpoint(seed_dir / "checkpoint")
        if ckpt is not None:
            summary_path = seed_dir / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            return ckpt, seeds, summary
    raise HFError(f"trial {record['number']}: no checkpoint under {folder}/seed-*/checkpoint")
