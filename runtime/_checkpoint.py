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

Several processes (torchrun): the files are always the full, unsharded model and optimizer state, so a run
resumes on any number of processes. A model sharded by FSDP2 is gathered with the distributed state-dict API
(``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``: a
collective every rank calls, the full tensors land on rank 0's CPU); rank 0 alone writes. Loading reads the
full files on every rank: weights into the unsharded model before it is wrapped, optimizer state through
``set_optimizer_state_dict``, which keeps each rank's shard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
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
    """Write a checkpoint folder at `path` atomically (see the module docstring).

    With several processes every rank calls it (a sharded model is gathered) and rank 0 writes.
    """
    path = Path(path)
    full_model: dict[str, torch.Tensor] | None = None
    opt_tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    sharded = is_sharded(model)
    if sharded:  # a collective: every rank takes part
        full_model, opt_tensors, groups = _gather_sharded(model, optimizer)
    if dist.is_initialized() and dist.get_rank() != 0:
        return  # before copying a replicated optimizer state to the host only to drop it
    if not sharded and optimizer is not None:
        opt_tensors, groups = _optimizer_tensors(model, optimizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if full_model is None:
            save_model(model, str(tmp / MODEL_FILE))
        else:
            save_file(full_model, str(tmp / MODEL_FILE))
        extra = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
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


def load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state of a checkpoint folder (into a plain or an FSDP2-sharded model's optimizer)."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    tensors = load_file(str(path / OPTIM_FILE)) if (path / OPTIM_FILE).is_file() else {}
    _load_optimizer(model, optimizer, tensors, state.get("param_groups", []))


def model_file(path: Path) -> Path:
    """The model.safetensors of a run dir, a checkpoint folder, or the file itself."""
    path = Path(path)
    if path.is_dir():
        ckpt = find_checkpoint(path / "checkpoint") or find_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no checkpoint (checkpoint/{MODEL_FILE}) found")
        path = ckpt / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return path


def check_shapes(path: Path, model: nn.Module) -> None:
    """Check a checkpoint's tensor names and shapes against `model` before any memory is spent on either.

    Reads only the safetensors header (no tensor data); `model` may live on the meta device.

    Raises:
        ValueError: one line naming the first differences.
    """
    path = model_file(path)
    saved = {k: tuple(v["shape"]) for k, v in _header(path).items() if k != "__metadata__"}
    want: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied weight is stored once (safetensors drops aliases)
            seen.add(id(t))
            want[name] = tuple(t.shape)
    missing = sorted(set(want) - set(saved))
    unexpected = sorted(set(saved) - set(want))
    wrong = [
        f"{k} {list(saved[k])} (the model's {list(want[k])})"
        for k in want
        if k in saved and saved[k] != want[k]
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing {missing[:4]}" if missing else "",
            f"unexpected {unexpected[:4]}" if unexpected else "",
        ]
        parts.append(f"shapes differ: {', '.join(wrong[:3])}" if wrong else "")
        raise ValueError(f"{path} does not match the model: {'; '.join(p for p in parts if p)}")


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: {name: {"dtype", "shape", "data_offsets"}} (the format's first 8 bytes are
    the header's length, little-endian; then the header in JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(100 * 2**20, path.stat().st_size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file")
    return header


def load_weights(path: Path, model: nn.Module) -> None:
    """Load only the weights: `path` is a run dir, a checkpoint folder or a model.safetensors file."""
    path = model_file(path)
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )


# ---------------------------------------------------------------------------------------------- optimizer


def is_sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are DTensors (FSDP2's fully_shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 has no public DTensor, nor the FSDP2 the trainer uses
        return False

    return any(isinstance(p, DTensor) for p in model.parameters())


def _gather_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Full model and optimizer state of an FSDP2 model on rank 0's CPU (empty on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=opts))
    full = {k: v.contiguous() for k, v in model_sd.items()}
    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        osd = cast(dict[str, Any], get_optimizer_state_dict(model, optimizer, options=opts))
        for fqn, st in osd.get("state", {}).items():
            for key, value in st.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{fqn}.{key}"] = t.detach().contiguous().cpu()
        for group in osd.get("param_groups", []):
            hyper = {k: v for k, v in group.items() if k != "params" and _is_json(v)}
            hyper["params"] = list(group["params"])
            groups.append(hyper)
    return full, tensors, groups


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
    if is_sharded(model):
        _load_sharded_optimizer(model, optimizer, tensors, groups)
        return
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


def _load_sharded_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model)
    live = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if [g["params"] for g in groups] != live:
        raise ValueError("checkpoint optimizer parameters do not match the model's")
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name in (n for g in live for n in g):
        prefix = f"optim.{name}."
        s = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if s:
            state[name] = s
    # hyperparameters stay the live optimizer's, as in the unsharded case
    param_groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": names_}
        for g, names_ in zip(optimizer.param_groups, live, strict=True)
    ]
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": param_groups},  # type: ignore[arg-type, dict-item]
        options=StateDictOptions(full_state_dict=True),
    )


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
