"""What a built model is made of and what runs it: layers, MoE dispatch, data, training, checkpoints.

Names resolve on first use (a module `__getattr__`, PEP 562), so importing the package costs nothing and
`from moeforge.runtime import TrainConfig` needs no torch: the search checks a spec's train options with
it when the spec loads, and `moeforge validate` answers without importing torch. `RunSummary` (a run
dir's summary.json) needs none either.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._config import MIN_STEPS, TrainConfig, budget_floor, budget_problem, min_steps
from ._launch import python_module_cmd, torchrun_args
from ._summary import RunSummary
from ._tracking import TRACKERS, MissingTracker, TrackerFailed, Tracking, check_trackers

if TYPE_CHECKING:
    from ._branch import StableRun, branch_point, ladder_tokens, train_cooldown, train_stable
    from ._checkpoint import check_shapes, find_checkpoint, load_checkpoint, load_weights, save_checkpoint
    from ._data import (
        Corpus,
        DataError,
        TokenStream,
        default_cache_dir,
        load_corpus,
        load_prepared,
        read_token_file,
        write_token_file,
    )
    from ._dist import Dist, PeerFailed, close_distributed, init_distributed, stop_on_sigterm, world_from_env
    from ._environment import environment
    from ._experts import HOST_SYNCS_PER_LAYER, Experts, grouped_mm_errors, grouped_mm_supported
    from ._layers import (
        Attention,
        Block,
        FeedForward,
        MLAttention,
        ModelOutput,
        MoE,
        Transformer,
        Yarn,
        init_weights,
        make_norm,
    )
    from ._metrics import LoadTracker, load_stats
    from ._prepare import prepare_data
    from ._schedule import lr_at, make_optimizer, planned_tokens
    from ._train import Diverged, OutOfMemory, Trainer, evaluate, resolve_device, train

# name -> the private module that defines it (all of them import torch)
_LAZY = {
    **dict.fromkeys(
        ("StableRun", "branch_point", "ladder_tokens", "train_cooldown", "train_stable"), "_branch"
    ),
    **dict.fromkeys(
        ("check_shapes", "find_checkpoint", "load_checkpoint", "load_weights", "save_checkpoint"),
        "_checkpoint",
    ),
    **dict.fromkeys(
        ("Dist", "PeerFailed", "close_distributed", "init_distributed", "stop_on_sigterm", "world_from_env"),
        "_dist",
    ),
    **dict.fromkeys(
        (
            "Corpus",
            "DataError",
            "TokenStream",
            "default_cache_dir",
            "load_corpus",
            "load_prepared",
            "read_token_file",
            "write_token_file",
        ),
        "_data",
    ),
    "prepare_data": "_prepare",
    "environment": "_environment",
    **dict.fromkeys(
        ("Experts", "HOST_SYNCS_PER_LAYER", "grouped_mm_errors", "grouped_mm_supported"), "_experts"
    ),
    **dict.fromkeys(
        (
            "Attention",
            "Block",
            "FeedForward",
            "MLAttention",
            "ModelOutput",
            "MoE",
            "Transformer",
            "Yarn",
            "init_weights",
            "make_norm",
        ),
        "_layers",
    ),
    **dict.fromkeys(("LoadTracker", "load_stats"), "_metrics"),
    **dict.fromkeys(("lr_at", "make_optimizer", "planned_tokens"), "_schedule"),
    **dict.fromkeys(
        ("Diverged", "OutOfMemory", "Trainer", "evaluate", "resolve_device", "train"),
        "_train",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "environment",
    "MIN_STEPS",
    "budget_floor",
    "budget_problem",
    "min_steps",
    "Corpus",
    "DataError",
    "default_cache_dir",
    "load_corpus",
    "load_prepared",
    "prepare_data",
    "TokenStream",
    "read_token_file",
    "write_token_file",
    "Attention",
    "Block",
    "Experts",
    "HOST_SYNCS_PER_LAYER",
    "grouped_mm_errors",
    "grouped_mm_supported",
    "FeedForward",
    "MLAttention",
    "Yarn",
    "ModelOutput",
    "MoE",
    "Transformer",
    "init_weights",
    "make_norm",
    "check_shapes",
    "find_checkpoint",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "LoadTracker",
    "load_stats",
    "Dist",
    "PeerFailed",
    "init_distributed",
    "close_distributed",
    "stop_on_sigterm",
    "world_from_env",
    "python_module_cmd",
    "torchrun_args",
    "TRACKERS",
    "MissingTracker",
    "TrackerFailed",
    "Tracking",
    "check_trackers",
    "Diverged",
    "OutOfMemory",
    "Trainer",
    "TrainConfig",
    "RunSummary",
    "evaluate",
    "lr_at",
    "make_optimizer",
    "planned_tokens",
    "resolve_device",
    "train",
    "StableRun",
    "branch_point",
    "ladder_tokens",
    "train_cooldown",
    "train_stable",
]
