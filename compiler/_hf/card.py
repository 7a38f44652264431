"""The model card (README.md) of an export folder: written from the spec, its accounting and, for a search
winner, the evidence that made it the winner. Pure text from its arguments; nothing is measured here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._accounting import account
from .._spec import MLASpec, ModelSpec
from .formats import ARCHITECTURES, REMOTE_CODE
from .weights import added_parameters

BYTE_VOCAB = 256


def _attention(spec: ModelSpec) -> str:
    a = spec.attention
    if isinstance(a, MLASpec):
        return f"MLA, {a.n_heads} heads (kv latent {a.kv_lora_rank}, q latent {a.q_lora_rank})"
    kv = f", {a.kv_heads} key/value heads" if a.kv_heads != a.n_heads else ""
    return f"{a.kind.upper()}, {a.n_heads} heads of {spec.head_dim}{kv}"


def _experts(spec: ModelSpec) -> str:
    d, moe = spec.moe_derived, spec.moe
    if d is None or moe is None:
        return "none (dense)"
    g = moe.gate
    shared = f"{d.shared_experts} shared (width {d.shared_hidden}) + " if d.shared_experts else ""
    routing = f"{g.score}{', renormalized' if g.normalize_topk else ''}"
    return f"{shared}top-{d.top_k} of {d.routed_experts} routed (width {d.expert_hidden}), {routing} scores"


def tokenizer_note(spec: ModelSpec) -> str:
    """How to turn text into this model's ids: byte-level ids need no tokenizer files."""
    if spec.vocab_size == BYTE_VOCAB:
        return (
            "Byte-level: a token id is one byte of UTF-8 text (vocabulary 256), so no tokenizer files come with "
            "the model.\n\n```python\nids = torch.tensor([list(text.encode('utf-8'))])\n"
            "text = bytes(model.generate(ids, max_new_tokens=64)[0].tolist()).decode('utf-8', errors='replace')\n```"
        )
    return (
        f"The vocabulary has {spec.vocab_size} ids: use the tokenizer of the token files the model was trained "
        "on (moeforge trains on ids and ships no tokenizer). Byte-level data (ids 0-255) decodes as UTF-8 bytes."
    )


def model_card(spec: ModelSpec, fmt: str, evidence: Mapping[str, Any] | None = None) -> str:
    """README.md for an export of `spec` as `fmt`; `evidence` describes a search winner (see the keys below).

    evidence keys (all optional): search, run_dir, trial, metric, value, budget_flops, seeds, seed_values,
    tokens, initial_val_loss, val_bits_per_byte, corpus, runner_up (a dict: trial, value, params), params
    (the trial's search parameters), n_complete.
    """
    acc = account(spec)
    remote = fmt in REMOTE_CODE
    load = (
        f"AutoModelForCausalLM.from_pretrained(path{', trust_remote_code=True' if remote else ''})"
        f"  # {ARCHITECTURES[fmt]}"
    )
    added = added_parameters(spec, fmt)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe, moeforge]",
        "---",
        "",
        f"# {spec.name or 'moeforge model'}",
        "",
        f"A {'mixture-of-experts' if spec.moe is not None else 'dense'} model written by `moeforge export hf` "
        f"as transformers' `{fmt}` format "
        f"({'remote code: the class is not in transformers' if remote else 'a stock class, no remote code'}).",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM",
        f"model = {load}",
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| layers x d_model | {spec.n_layers} x {spec.d_model} |",
        f"| attention | {_attention(spec)} |",
        f"| experts per MoE layer | {_experts(spec)} |",
        f"| MoE layers | {len(spec.moe_layers)} of {spec.n_layers} |",
        f"| vocabulary, context | {spec.vocab_size}, {spec.seq_len} |",
        "",
        "## Accounting (moeforge, exact)",
        "",
        f"- parameters: {acc.params_total:,} total, {acc.params_activated:,} activated per token "
        "(both embeddings counted)",
        f"- forward FLOPs per token: {sum(acc.forward_flops.values()):,} (2 per multiply-add)",
    ]
    if added:
        n_hf = acc.params_total + sum(added.values())
        why = "; ".join(f"{v:+,} {k}" for k, v in added.items())
        lines.append(f"- transformers' `num_parameters()` gives {n_hf:,}: {why}")
    if fmt == "qwen2_moe" and spec.moe is not None and not spec.moe.shared_gate:
        d = spec.moe_derived
        assert d is not None
        lines.append(
            f"- qwen2_moe's shared expert is this spec's {d.shared_experts} shared expert(s) side by side; its "
            "sigmoid gate weight is 0 (a gate of 0.5) and its down projection is stored doubled, so the model "
            "computes exactly the spec. Keep the gate at 0 when fine-tuning to stay in the spec "
            "(`moeforge import hf` checks it)."
        )
    if evidence:
        lines += ["", "## Why this model: the search", ""]
        e = evidence
        metric = e.get("metric", "objective")
        if "search" in e:
            lines.append(
                f"- search `{e['search']}`" + (f" (run dir `{e['run_dir']}`)" if "run_dir" in e else "")
            )
        if "trial" in e:
            params = f" with {e['params']}" if e.get("params") else ""
            lines.append(f"- trial {e['trial']}{params}")
        if "value" in e:
            lines.append(f"- {metric}: {e['value']:.4f}" + _seeds(e))
        if "budget_flops" in e:
            lines.append(f"- training budget: {e['budget_flops']:.3g} FLOPs per seed")
        if e.get("tokens"):
            lines.append(
                f"- trained tokens: {e['tokens']:,}" + (f" of {e['corpus']}" if e.get("corpus") else "")
            )
        if e.get("initial_val_loss") is not None:
            lines.append(f"- validation loss before training: {e['initial_val_loss']:.4f}")
        if e.get("val_bits_per_byte") is not None:
            lines.append(f"- validation bits per byte: {e['val_bits_per_byte']:.4f}")
        if e.get("n_complete"):
            lines.append(f"- trials completed: {e['n_complete']}")
        ru = e.get("runner_up")
        if ru:
            lines.append(
                f"- runner-up: trial {ru['trial']} ({ru.get('params', {})}), {metric} {ru['value']:.4f}"
            )
        else:
            lines.append("- runner-up: none (no other trial completed)")
    lines += ["", "## Tokenizer", "", tokenizer_note(spec), ""]
    return "\n".join(lines)


def _seeds(e: Mapping[str, Any]) -> str:
    seeds = e.get("seeds")
    if not seeds:
        return ""
    values = e.get("seed_values")
    if values:
        return f" (mean over seeds {list(seeds)}: {', '.join(f'{v:.4f}' for v in values)})"
    return f" (seeds {list(seeds)})"
