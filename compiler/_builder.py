"""Spec -> nn.Module. The only place that reads a spec to construct runtime modules."""

from __future__ import annotations

import torch
from torch import nn

from runtime import Attention, Block, FeedForward, MoE, Transformer, init_weights, make_norm

from ._spec import ModelSpec, RopeSpec


def _attention(spec: ModelSpec) -> Attention:
    a = spec.attention
    return Attention(
        spec.d_model,
        n_heads=a.n_heads,
        n_kv_heads=a.kv_heads,
        head_dim=spec.head_dim,
        qkv_bias=a.qkv_bias,
        out_bias=a.out_bias,
        qk_norm=a.qk_norm,
        rope_theta=spec.positions.theta if isinstance(spec.positions, RopeSpec) else None,
        norm_eps=spec.norm.eps,
    )


def _ffn(spec: ModelSpec, i: int) -> nn.Module:
    d = spec.moe_derived
    if not spec.is_moe_layer(i) or d is None or spec.moe is None:
        return FeedForward(spec.d_model, spec.ffn.hidden, spec.ffn.activation)
    moe = spec.moe
    return MoE(
        spec.d_model,
        n_routed=d.routed_experts,
        top_k=d.top_k,
        hidden=d.expert_hidden,
        n_shared=d.shared_experts,
        shared_hidden=d.shared_hidden,
        activation=spec.ffn.activation,
        normalize_topk=moe.gate.normalize_topk,
        routed_scaling=moe.gate.routed_scaling,
        expert_alpha=moe.balance.expert_alpha,
        per_sequence=moe.balance.per_sequence,
        device_alpha=moe.balance.device_alpha,
        device_groups=moe.balance.device_groups,
        capacity_factor=moe.capacity_factor,
    )


def build(
    spec: ModelSpec,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> Transformer:
    """Build the model a spec describes.

    Args:
        spec: a validated model spec.
        device: where to allocate; ``"meta"`` allocates nothing (for counting huge models). Default CPU.
        dtype: parameter dtype; default float32.
        seed: seeds the weight initialization when given.

    Returns:
        A `runtime.Transformer`; ``model(input_ids)`` gives ``.logits`` [B, S, V] and ``.aux_loss``.
    """
    device = torch.device(device or "cpu")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        blocks = [
            Block(_attention(spec), _ffn(spec, i), spec.norm.kind, spec.d_model, spec.norm.eps)
            for i in range(spec.n_layers)
        ]
        model = Transformer(
            spec.vocab_size,
            spec.d_model,
            blocks,
            make_norm(spec.norm.kind, spec.d_model, spec.norm.eps),
            tie_embeddings=spec.tie_embeddings,
            max_positions=spec.seq_len if spec.positions.kind == "learned" else None,
        )
    if device.type != "meta":
        init_weights(model, spec.init_std, spec.n_layers)
    if dtype is not None:
        model = model.to(dtype)
    return model
