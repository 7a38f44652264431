"""What a built model is made of and what runs it: layers, MoE dispatch, data, training, checkpoints."""

from ._experts import Experts
from ._layers import Attention, Block, FeedForward, ModelOutput, MoE, Transformer, init_weights, make_norm

__all__ = [
    "Attention",
    "Block",
    "Experts",
    "FeedForward",
    "ModelOutput",
    "MoE",
    "Transformer",
    "init_weights",
    "make_norm",
]
