"""Checkpoints in safetensors: weights, AdamW state and RNG as tensors, everything else as JSON.

A checkpoint is a folder:

    checkpoint/
      model.safetensors      the model's state dict (shared tensors, e.g. tied embeddings, stored once)
      optimizer.safetensors  "<param name>.<state key>" per AdamW state tensor (exp_avg, exp_avg_sq, step),
                             "rng.*" generator states (uint8), and any extra tensors (e.g. "load.<layer>")
      state.json             step, tokens, wall time, schedule, param group hyperparameters: plain JSON

Loading reads only safetensors and JSON: nothing is ever unpickled. Writing is atomic: the folder is
written under a temporary name beside the target and renamed into place; the previous checkpoint is moved
aside first and removed after, so a crash at any moment leaves `checkpoint/` or `checkpoint.old/` whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

FORMAT = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint folder at `path` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_model(model, str(tmp / MODEL_FILE))
        extra = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
        groups: list[dict[str, Any]] = []
        if optimizer is not None:
            opt_tensors, groups = _optimizer_tensors(model, optimizer)
            extra.update(opt_tensors)
        save_file(extra, str(tmp / OPTIM_FILE))
        doc = {"format": FORMAT, **state, "param_groups": groups}
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1))
        _fsync_dir(tmp)
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder to load: `path` if whole, else `path.old` left by a crash mid-write."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".old")):
        if (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file():
            return p
    return None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights (strictly) and, when given, optimizer state, from a checkpoint folder.

    Returns:
        The state.json document and the remaining tensors of optimizer.safetensors (rng.*, load.*, ...).
    """
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT}")
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / MODEL_FILE} does not match the model: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    tensors = load_file(str(path / OPTIM_FILE)) if (path / OPTIM_FILE).is_file() else {}
    if optimizer is not None:
        _load_optimizer(model, optimizer, tensors, state.get("param_groups", []))
    rest = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    return state, rest


def load_weights(path: Path, model: nn.Module) -> None:
    """Load only the weights: `path` is a run dir, a checkpoint folder or a model.safetensors file."""
    path = Path(path)
    if path.is_dir():
        ckpt = find_checkpoint(path / "checkpoint") or find_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no checkpoint (checkpoint/{MODEL_FILE}) found")
        path = ckpt / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )


# ---------------------------------------------------------------------------------------------- optimizer


def _param_names(model: nn.Module) -> dict[int, str]:
    # remove_duplicate: a tied weight has one name, the first
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params" and _is_json(v)}
        hyper["params"] = [names[id(p)] for p in group["params"]]
        groups.append(hyper)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{names[id(p)]}.{key}"] = t.detach().contiguous().cpu()
    return tensors, groups


def _load_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    names = _param_names(model)
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]):
        raise ValueError(
            f"checkpoint has {len(groups)} optimizer param groups, the optimizer {len(current['param_groups'])}"
        )
    state: dict[int, dict[str, torch.Tensor]] = {}
    index = 0
    for saved, group in zip(groups, optimizer.param_groups, strict=True):
        saved_names = saved["params"]
        live_names = [names[id(p)] for p in group["params"]]
        if saved_names != live_names:
            raise ValueError("checkpoint optimizer parameters do not match the model's")
        for name in live_names:
            prefix = f"optim.{name}."
            s = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if s:
                state[index] = s
            index += 1
    # hyperparameters stay the live optimizer's (the caller's config; lr is set by the schedule every step)
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _is_json(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_json(x) for x in v)
    return False


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
