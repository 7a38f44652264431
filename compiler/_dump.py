"""Spec -> YAML text that loads back to an equal spec."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from ._spec import ModelSpec


def _keep_kinds(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """Put back the `kind` tags that exclude_defaults dropped: discriminated unions need them."""
    if "kind" in type(model).model_fields:
        data = {"kind": model.kind, **data}  # type: ignore[attr-defined]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel) and name in data:
            data[name] = _keep_kinds(value, data[name])
    return data


def spec_to_yaml(spec: BaseModel, header: str = "") -> str:
    """The spec as YAML, defaults left out, keys in schema order; it loads back equal."""
    data = _keep_kinds(spec, spec.model_dump(mode="json", exclude_defaults=True))
    if isinstance(spec, ModelSpec):
        data = {"name": spec.name, **data}  # always named, even when it is the default
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
