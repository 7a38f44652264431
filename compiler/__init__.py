"""Text -> validated spec -> counts and model.

Public API:
    load_spec(path_or_name, overrides=()) -> ModelSpec
    build(spec, device=None, dtype=None, seed=None) -> nn.Module
    materialize(meta_model, spec, device, seed=None) -> nn.Module (a build on "meta", allocated and initialized)
    account(spec, causal=False) -> Accounting
    memory(spec, dtype="bf16") -> MemoryEstimate
    measure(spec, batch_size=1, seq_len=None) -> dict (FlopCounterMode, fvcore, numel)
    model_schema() -> dict (JSON Schema)
    report_dict(spec, dtype="bf16", causal=False) -> dict (what `moeforge report --json` prints)
    import_hf / export_hf / check_against_transformers / check_passes: Hugging Face interop (HFError on what
    cannot map); choose_format(spec, "auto") names the stock transformers class a spec exports as, model_card
    writes an export's README.md

Reading other YAML documents (search specs) the way specs are read, with located problems:
    resolve, read_yaml, load_document, apply_overrides, merge_specs, validate, locate, model_classes;
    Loc, Locs, Problem, SpecError
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._accounting import COMPONENTS, Accounting, LayerCounts, MemoryEstimate, account, memory
from ._dump import spec_to_yaml
from ._hf.card import model_card
from ._hf.check import check_against_transformers, check_passes
from ._hf.expressible import choose_format
from ._hf.formats import HFError
from ._hf.io import export_hf, import_hf
from ._loader import (
    Loc,
    Locs,
    Problem,
    SpecError,
    apply_overrides,
    load_document,
    load_validated,
    locate,
    merge_specs,
    model_classes,
    read_yaml,
    resolve,
    shipped_dir,
    shipped_names,
    validate,
)
from ._report import report_dict
from ._spec import ModelSpec, MoEDerived

if TYPE_CHECKING:
    from ._builder import build, materialize
    from ._measure import measure

# Only building and measuring a model need torch: they import on first use (a module `__getattr__`, PEP
# 562), so reading, validating and counting specs (`moeforge validate`, `report`) never import it.
_LAZY = {"build": "_builder", "materialize": "_builder", "measure": "_measure"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def load_spec(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModelSpec:
    """Read a model spec from a YAML path or a shipped name (``deepseekmoe-16b``).

    Raises:
        SpecError: with one located ``file:line:col: key: message`` line per problem.
    """
    return load_validated(ModelSpec, path_or_name, "models", overrides)


def model_schema() -> dict:
    """The JSON Schema of model specs (editors use it through the yaml-language-server comment).

    Adds the file-level ``base:`` key, which the loader resolves before validation.
    """
    schema = ModelSpec.model_json_schema()
    base = {
        "type": "string",
        "description": "Inherit another spec (a path relative to this file, or a shipped name).",
    }
    schema["properties"] = {"base": base, **schema["properties"]}
    return schema


__all__ = [
    "COMPONENTS",
    "Accounting",
    "HFError",
    "LayerCounts",
    "Loc",
    "Locs",
    "MemoryEstimate",
    "ModelSpec",
    "MoEDerived",
    "Problem",
    "SpecError",
    "account",
    "apply_overrides",
    "build",
    "check_against_transformers",
    "check_passes",
    "choose_format",
    "export_hf",
    "import_hf",
    "load_document",
    "load_spec",
    "load_validated",
    "locate",
    "materialize",
    "measure",
    "memory",
    "merge_specs",
    "model_card",
    "model_classes",
    "model_schema",
    "read_yaml",
    "report_dict",
    "resolve",
    "shipped_dir",
    "shipped_names",
    "spec_to_yaml",
    "validate",
]
