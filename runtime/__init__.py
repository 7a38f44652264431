"""What a built model is made of and what runs it: layers, MoE dispatch, data, training, checkpoints."""

from ._checkpoint import load_checkpoint, load_weights, save_checkpoint
from ._data import Corpus, DataError, default_cache_dir, load_corpus, read_token_file, write_token_file
from ._experts import Experts
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
from ._train import Diverged, OutOfMemory, TrainConfig, evaluate, lr_at, planned_tokens, resolve_device, train

__all__ = [
    "Corpus",
    "DataError",
    "default_cache_dir",
    "load_corpus",
    "read_token_file",
    "write_token_file",
    "Attention",
    "Block",
    "Experts",
    "FeedForward",
    "MLAttention",
    "Yarn",
    "ModelOutput",
    "MoE",
    "Transformer",
    "init_weights",
    "make_norm",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "LoadTracker",
    "load_stats",
    "Diverged",
    "OutOfMemory",
    "TrainConfig",
    "evaluate",
    "lr_at",
    "planned_tokens",
    "resolve_device",
    "train",
]
