"""Spec -> nn.Module. The only place that reads a spec to construct runtime modules."""

from __future__ import annotations

import torch
from moeforge.runtime import (
    Attention,
    Block,
    FeedForward,
    MLAttention,
    MoE,
    Transformer,
    Yarn,
    init_weights,
    make_norm,
)
from torch import nn

from ._spec import MLASpec, ModelSpec, RopeSpec


def _yarn(spec: ModelSpec) -> Yarn | None:
    if not isinstance(spec.positions, RopeSpec) or spec.positions.yarn is None:
        return None
    y = spec.positions.yarn
    return Yarn(
        y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow, y.mscale, y.mscale_all_dim
    )


def _attention(spec: ModelSpec) -> Attention | MLAttention:
    a = spec.attention
    rope_theta = spec.positions.theta if isinstance(spec.positions, RopeSpec) else None
    if isinstance(a, MLASpec):
        return MLAttention(
            spec.d_model,
            n_heads=a.n_heads,
            q_lora_rank=a.q_lora_rank,
            kv_lora_rank=a.kv_lora_rank,
            qk_nope_head_dim=a.qk_nope_head_dim,
            qk_rope_head_dim=a.qk_rope_head_dim,
            v_head_dim=a.v_head_dim,
            bias=a.bias,
            latent_norm_eps=a.latent_norm_eps,
            rope_theta=rope_theta,
            yarn=_yarn(spec),
            rope_interleave=a.rope_interleave,
        )
    return Attention(
        spec.d_model,
        n_heads=a.n_heads,
        n_kv_heads=a.kv_heads,
        head_dim=spec.head_dim,
        qkv_bias=a.qkv_bias,
        out_bias=a.out_bias,
        qk_norm=a.qk_norm,
        rope_theta=rope_theta,
        norm_eps=spec.norm.eps,
        yarn=_yarn(spec),
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
        score=moe.gate.score,
        selection_bias=moe.gate.selection_bias,
        bias_update_speed=moe.gate.bias_update_speed,
        bias_is_parameter=moe.gate.bias_is_parameter,
        n_group=moe.gate.n_group,
        topk_group=moe.gate.topk_group,
        shared_gate=moe.shared_gate,
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
        device: where to allocate; ``"meta"`` allocates nothing (for counting huge models, or to check a
            checkpoint before `materialize`). Default CPU.
        dtype: parameter dtype; default float32.
        seed: seeds the weight initialization when given: the weights depend on the seed (and the device's
            generator) alone, so `materialize(build(spec, "meta"), spec, device, seed)` gives the same model.

    Returns:
        A `moeforge.runtime.Transformer`; ``model(input_ids)`` gives ``.logits`` [B, S, V] and ``.aux_loss``.
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
        _init(model, spec, seed)
    if dtype is not None:
        model = model.to(dtype)
    return model


def materialize(
    model: Transformer, spec: ModelSpec, device: str | torch.device, seed: int | None = None
) -> Transformer:
    """Allocate a model built on the meta device on `device` and initialize it as `build` would there.

    Nothing is allocated before this: a checkpoint's shapes can be checked against the meta model first
    (`moeforge.runtime.check_shapes`), and a model too large for the host goes straight to the GPU.
    """
    model.to_empty(device=device)
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm | nn.LayerNorm)]
        for m in norms:
            m.reset_parameters()  # ones (and zero biases)
        in_norms = {id(t) for m in norms for t in m.parameters()}
        # every other tensor of fewer than 2 dims starts at zero (biases, selection biases and their
        # counts); tensors of 2 or more dims are what init_weights draws
        for t in (*model.parameters(), *model.buffers()):
            if t.dim() < 2 and id(t) not in in_norms:
                t.zero_()
    _init(model, spec, seed)
    return model


def _init(model: Transformer, spec: ModelSpec, seed: int | None) -> None:
    # seeded again here, so the draws do not depend on what the constructors drew (nothing, on meta)
    if seed is not None:
        torch.manual_seed(seed)
    init_weights(model, spec.init_std, spec.n_layers)
