"""Model folders on disk: `moeforge import hf` (config.json and safetensors shards -> OUT/<name>.yaml and our
model.safetensors) and `moeforge export hf` (a spec and a checkpoint -> config.json, model.safetensors,
README.md). transformers is not needed here."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._dump import spec_to_yaml
from .._spec import ModelSpec
from .card import model_card
from .export import spec_to_config
from .formats import HFError
from .importer import config_to_spec
from .weights import hf_to_state_dict, state_dict_to_hf


class _LazyTensors(Mapping[str, Any]):
    """Tensors of one or more safetensors files, read on access."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._handles = []
        for f in files:
            try:
                self._handles.append(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise HFError(f"{f}: not a readable safetensors file ({e})") from None
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def __getitem__(self, key: str) -> Any:
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))


def import_hf(
    src: str | Path, out: str | Path, name: str | None = None
) -> tuple[Path, Path | None, list[str]]:
    """`moeforge import hf`: SRC (config.json or a model folder) -> OUT/<name>.yaml [+ OUT/model.safetensors].

    Returns:
        (spec path, weights path or None, notes on fields that were deliberately not imported).
    """

    src = Path(src)
    config_path = src / "config.json" if src.is_dir() else src
    if not config_path.is_file():
        raise HFError(f"{config_path}: no such config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{config_path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFError(f"{config_path}: a JSON {type(config).__name__}, not an object of config fields")
    model_dir = config_path.parent
    name = name or (model_dir.name if model_dir.name not in ("", ".") else config.get("model_type", "model"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lower() or "model"
    spec, notes = config_to_spec(config, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"Imported from {config_path} (model_type {config['model_type']}) by `moeforge import hf`."
    spec_path = out / f"{name}.yaml"
    spec_path.write_text(spec_to_yaml(spec, header=header))
    files = _weight_files(model_dir) if src.is_dir() else []
    if not files:
        return spec_path, None, notes
    if config.get("quantization_config"):
        raise HFError("quantization_config: quantized checkpoints cannot be imported; dequantize them first")
    from safetensors.torch import save_file

    state = hf_to_state_dict(spec, config["model_type"], _LazyTensors(files))
    weights_path = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_path))
    return spec_path, weights_path, notes


def _read_checkpoint(spec: ModelSpec, checkpoint: str | Path) -> dict[str, Any]:
    """Our state_dict from a model.safetensors file (or a folder holding one), checked against `spec`."""
    import torch
    from safetensors.torch import load_file

    from .._builder import build

    ckpt = Path(checkpoint)
    if ckpt.is_dir():
        found = [
            p for p in (ckpt / "model.safetensors", ckpt / "checkpoint" / "model.safetensors") if p.is_file()
        ]
        found = found or sorted(ckpt.rglob("model.safetensors"))
        if not found:
            raise HFError(f"{ckpt}: no model.safetensors inside")
        ckpt = found[0]
    if not ckpt.is_file():
        raise HFError(f"{ckpt}: no such checkpoint")
    from safetensors import SafetensorError

    try:
        state = load_file(str(ckpt))
    except (SafetensorError, OSError) as e:
        raise HFError(f"{ckpt}: not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(spec).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise HFError(f"{ckpt}: {key} missing; is it a checkpoint of spec {spec.name!r}?")
        if tuple(state[key].shape) != shape:
            raise HFError(
                f"{ckpt}: {key} has shape {list(state[key].shape)}, spec {spec.name!r} builds {list(shape)}; "
                "is it a checkpoint of this spec?"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise HFError(f"{ckpt}: {extra[0]} is not in spec {spec.name!r} ({len(extra)} such tensors)")
    return state


def _check_out(out: Path, cfg: dict[str, Any], force: bool) -> None:
    """Refuse to mix two models in one folder: OUT may be new, empty, or hold an export of this config."""
    if force or not out.exists():
        return
    if not out.is_dir():
        raise HFError(f"{out}: exists and is not a folder")
    old = out / "config.json"
    if old.is_file():
        try:
            same = json.loads(old.read_text()) == json.loads(json.dumps(cfg))
        except json.JSONDecodeError:
            same = False
        if not same:
            raise HFError(f"{out}: holds another model's config.json; choose a new --out (or --force)")
    elif any(out.glob("*.safetensors")):
        raise HFError(f"{out}: holds weights of another model; choose a new --out (or --force)")


def export_hf(
    spec: ModelSpec,
    out: str | Path,
    checkpoint: str | Path | None = None,
    family: str | None = None,
    card: str | None = None,
    force: bool = False,
) -> tuple[Path, Path | None]:
    """`moeforge export hf`: OUT/config.json, OUT/model.safetensors when a checkpoint is given, OUT/README.md.

    Args:
        spec: the model.
        out: the folder to write; one that holds another model is refused unless `force`.
        checkpoint: our model.safetensors, or a folder holding one (a run dir or its checkpoint/).
        family: a format name (see FAMILIES); None or "auto" picks the first stock one (EXPORT_ORDER).
        card: the model card (README.md); None writes `model_card(spec, format)`.
        force: overwrite whatever OUT holds.

    Raises:
        HFError: no format expresses the spec, the checkpoint does not match it, OUT holds another model.
    """

    cfg = spec_to_config(spec, family)
    out = Path(out)
    _check_out(out, cfg, force)
    state = _read_checkpoint(spec, checkpoint) if checkpoint is not None else None
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").write_text(card if card is not None else model_card(spec, cfg["model_type"]))
    if state is None:
        return config_path, None
    from safetensors.torch import save_file

    tensors = state_dict_to_hf(spec, cfg["model_type"], state)
    weights_path = out / "model.safetensors"
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    return config_path, weights_path


__all__ = ["export_hf", "import_hf"]
