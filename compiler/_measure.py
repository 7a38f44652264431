"""Measure a built model's FLOPs and parameters, to check the analytic accounting against torch.

Two independent counters run on a float32 CPU model fed random token ids:

* ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) on a forward, and on a forward
  plus a backward from a random upstream gradient (``torch._grouped_mm``'s backward fails on the
  zero-stride gradient ``.sum()`` would give);
* fvcore's ``FlopCountAnalysis`` on a traced forward (1 FLOP per multiply-add; reported x 2).

Neither counts everything the model runs out of the box, so handlers are registered here, in the accounting
module's convention (see ``_accounting``): attention over the full (non-causal) square, 4*B*H*Sq*Sk*dh
forward and twice that backward; ``torch._grouped_mm`` as 2 x rows x in x out summed over the groups. Ops
that are not matmuls (softmax, top-k, index_add, norms, activations) stay uncounted, as in the accounting.

Routed experts: by default the experts run their reference per-expert loop (``dispatch="loop"``), which
executes exactly the matmuls the convention counts, whatever the routing. The fast paths execute what their
layout needs: zero padding of D and F to _grouped_mm's 16-byte alignment, the empty rows of every expert's
[E, C, D] buffer for ``padded_bmm``, and fewer rows when a capacity drops tokens; pass ``dispatch=`` to
measure one of them as it runs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from ._accounting import memory
from ._spec import ModelSpec

aten = torch.ops.aten

# Share of physical memory a measurement may use (weights, gradients and activations, fp32).
MEMORY_FRACTION = 0.25


# ------------------------------------------------------------------------------ FlopCounterMode formulas
def _sdpa_forward_flops(q_shape, k_shape, v_shape) -> int:
    """Q K^T and A V over the full square: 2*B*H*Sq*Sk*dh each (causal masks are not subtracted)."""
    b, h, sq, dq = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * dq + 2 * b * h * sq * sk * dv


def _sdpa_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_forward_flops(query, key, value)


def _sdpa_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # Gradients for the inputs of both matmuls: twice the forward, as for any matmul (training = 3 x forward).
    # torch's own formula also counts flash attention's recomputation of the scores (2.5 x).
    return 2 * _sdpa_forward_flops(query, key, value)


def _grouped_mm(a, b, *args, out_shape=None, **kwargs) -> int:
    """2 x rows x in x out summed over groups, for each operand layout _grouped_mm accepts."""
    if len(a) == 2 and len(b) == 3:  # [N, K] x [G, K, M], offs split N
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:  # [M, N] x [N, K] -> [G, M, K], offs split the contraction N
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:  # [G, M, K] x [K, N], offs split N
        return 2 * a[1] * a[2] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]  # [G, M, K] x [G, K, N]: a batched matmul


def _flop_counter_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    forward = [
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    for name in forward:
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _sdpa_fwd
        if hasattr(aten, name + "_backward"):
            mapping[getattr(aten, name + "_backward")] = _sdpa_bwd
    if hasattr(aten, "_grouped_mm"):
        mapping[aten._grouped_mm] = _grouped_mm
    return mapping


# ----------------------------------------------------------------------------------- fvcore handlers
def _fvcore_handles() -> dict[str, Any]:
    from fvcore.nn.jit_handles import get_shape

    def sdpa(inputs, outputs) -> int:  # in multiply-adds, as fvcore counts
        q, k, v = (get_shape(inputs[i]) for i in range(3))
        return _sdpa_forward_flops(q, k, v) // 2

    def grouped(inputs, outputs) -> int:
        return _grouped_mm(get_shape(inputs[0]), get_shape(inputs[1])) // 2

    def uncounted(inputs, outputs) -> int:
        return 0

    # fvcore counts norms by default; the accounting counts matmuls only. (A None handle would not do:
    # fvcore 0.1.5 keeps its default handle for an op set to None.)
    not_matmuls = ("aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm")
    return {
        "aten::scaled_dot_product_attention": sdpa,
        "aten::_scaled_dot_product_flash_attention_for_cpu": sdpa,
        "aten::_grouped_mm": grouped,
        **dict.fromkeys(not_matmuls, uncounted),
    }


class _Logits(nn.Module):
    """The model with a plain tensor output, as jit tracing needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


# -------------------------------------------------------------------------------------------- measure
def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(spec: ModelSpec, tokens: int) -> None:
    mem = memory(spec, "fp32")
    need = 2 * mem.weights_bytes + tokens * mem.activation_bytes_per_token  # weights, grads, activations
    ram = _physical_memory()
    if ram is not None and need > MEMORY_FRACTION * ram:
        raise ValueError(
            f"{spec.name} is too big to measure here: about {need / 2**30:.1f} GiB in fp32 for weights, "
            f"gradients and activations, over {MEMORY_FRACTION:.0%} of this machine's "
            f"{ram / 2**30:.1f} GiB; measure a smaller spec (the counts are exact without --measure)"
        )


def _set_dispatch(model: nn.Module, dispatch: str | None) -> str | None:
    """Set every routed-experts module's `dispatch`; return the one in use (None for a dense model)."""
    from moeforge.runtime import Experts

    used = None
    for m in model.modules():
        if isinstance(m, Experts):
            if dispatch is not None:
                m.dispatch = dispatch  # type: ignore[assignment]  # Experts checks it when it runs
            used = str(m.dispatch)
    return used


def measure(
    spec: ModelSpec,
    batch_size: int = 1,
    seq_len: int | None = None,
    dispatch: str | None = "loop",
    seed: int = 0,
) -> dict[str, Any]:
    """Build `spec` in float32 on the CPU and count what it computes on random token ids.

    Args:
        spec: a validated model spec.
        batch_size: sequences per measured batch.
        seq_len: tokens per sequence; default ``spec.seq_len`` (the attention FLOPs depend on it).
        dispatch: how routed experts run (``moeforge.runtime.Experts.dispatch``); the default ``"loop"`` executes
            exactly the matmuls the accounting counts; None keeps the built model's own.
        seed: seeds the weights and the token ids.

    Returns:
        ``forward_flops_per_token`` and ``train_flops_per_token`` (FlopCounterMode; training = forward +
        backward), ``fvcore_forward_flops_per_token`` (fvcore x 2), ``params_total`` (numel), ``seq_len``,
        ``batch_size``, ``dispatch``. FLOPs per token are floats (totals divided by batch x seq_len).

    Raises:
        ValueError: when the model would not fit comfortably in this machine's memory.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with warnings.catch_warnings():  # fvcore's imports use torch.jit.script, deprecated in torch 2.x
        warnings.simplefilter("ignore", DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis

    from ._builder import build

    seq = spec.seq_len if seq_len is None else seq_len
    if batch_size < 1 or seq < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq}")
    if spec.positions.kind == "learned" and seq > spec.seq_len:
        raise ValueError(f"seq_len: {seq} exceeds the learned position table ({spec.seq_len})")
    _check_fits(spec, batch_size * seq)
    tokens = batch_size * seq

    model = build(spec, device="cpu", dtype=torch.float32, seed=seed)
    used = _set_dispatch(model, dispatch)
    params_total = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch_size, seq), generator=gen)
    mapping = _flop_counter_mapping()

    model.eval()  # no dropout anywhere, but keep measurements deterministic
    with torch.no_grad():
        model(ids[:, : min(seq, 4)])  # warm-up outside the counters: `auto` dispatch probes _grouped_mm once
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fwd:
        model(ids)
    forward = fwd.get_total_flops()

    with FlopCounterMode(display=False, custom_mapping=mapping) as train:
        logits = model(ids).logits
        logits.backward(torch.randn(logits.shape, generator=gen))
    train_flops = train.get_total_flops()
    model.zero_grad(set_to_none=True)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        analysis = FlopCountAnalysis(_Logits(model), (ids,))
        analysis.set_op_handle(**_fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        fv = analysis.total()

    return {
        "forward_flops_per_token": forward / tokens,
        "train_flops_per_token": train_flops / tokens,
        "fvcore_forward_flops_per_token": 2 * fv / tokens,
        "params_total": params_total,
        "seq_len": seq,
        "batch_size": batch_size,
        "dispatch": used,
    }
