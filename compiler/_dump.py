"""Spec -> YAML text that loads back to an equal spec."""

from __future__ import annotations

import yaml

from ._spec import ModelSpec

def spec_to_yaml(spec: ModelSpec, header: str = "") -> str:
    """The spec as YAML, defaults left out, keys in schema order; ``load_spec`` reads it back equal."""
    data = spec.model_dump(mode="json", exclude_defaults=True)
    data = {"name": spec.name, **data}  # always name it, even when it is the default
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
