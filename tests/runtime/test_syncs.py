"""Host syncs per training step: how often one forward+backward of the debug model waits for the device.

On CUDA a host sync stalls the CPU until the GPU has caught up, so the next kernels are not queued in time.
The CPU has no such stall, so here the count is of the calls that would sync on CUDA, made during one
forward+backward:

* ops that read a value back to the host: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)`` (all are
  ``aten._local_scalar_dense``), ``.tolist()``, ``.numpy()``, ``.cpu()``;
* ops whose output size depends on values: ``nonzero`` (``torch.where(mask)``), indexing with a boolean
  mask, ``masked_select``, ``unique``, ``bincount`` (it reads the largest index to size its output),
  ``repeat_interleave`` without ``output_size``.

Expected per MoE layer per step (the debug model has 2 MoE layers of 8 routed experts):

* ``grouped_mm``: 0 (offsets stay on the device);
* ``fused_loop`` and ``padded_bmm``: 1, the ``.tolist()`` of the kept counts that sizes the Python loop or
  the padded buffer;
* with a capacity factor every fast path: 1, the same ``.tolist()`` (it also sizes the kept pairs, which
  ``nonzero_static`` then selects without a second sync);
* ``loop`` (the test oracle): E, one ``torch.where`` per expert.

Where CUDA exists the same step runs under ``torch.cuda.set_sync_debug_mode("warn")``, and its warnings minus
those of the same model with dense FFNs (torch syncs inside some other layers' CUDA kernels) are counted; that
test is skipped without CUDA.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from moeforge.compiler import build, load_spec
from moeforge.runtime._experts import HOST_SYNCS_PER_LAYER
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.bincount.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
}
_HOST_READS = ("tolist", "numpy", "cpu")  # .item() is _local_scalar_dense
_TORCH_DIR = os.path.dirname(torch.__file__)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this file: the code that asked for the sync."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return "?"
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


class _SyncOps(TorchDispatchMode):
    def __init__(self, seen: Counter):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = func in _SYNC_OPS
        if func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            sync = True
        if func in (
            torch.ops.aten.index.Tensor,
            torch.ops.aten.index_put_.default,
            torch.ops.aten.index_put.default,
        ):
            sync = any(i is not None and i.dtype == torch.bool for i in args[1])
        if sync:
            self.seen[f"{func.overloadpacket.__name__} at {_caller()}"] += 1
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Count the calls that sync with the host on CUDA, by kind and caller (see the module docstring)."""
    seen: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(name):
        real = saved[name]

        def method(self, *args, **kwargs):
            seen[f"{name} at {_caller()}"] += 1
            return real(self, *args, **kwargs)

        return method

    try:
        for name in _HOST_READS:  # on CPU these do not reach the dispatcher
            setattr(torch.Tensor, name, counting(name))
        with _SyncOps(seen):
            yield seen
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)


def _step(model, x, y) -> None:
    """One training forward+backward, as the trainer does it (without its optimizer and logging)."""
    out = model(x)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten()) + out.aux_loss
    loss.backward()


def _model(dispatch: str, overrides: tuple[str, ...] = (), device: str = "cpu"):
    spec = load_spec("debug", list(overrides))
    model = build(spec, seed=0).to(device)
    model.train()
    for _, moe in model.moe_layers():
        moe.experts.dispatch = dispatch
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, spec.vocab_size, (4, spec.seq_len + 1), generator=gen)
    return model, x[:, :-1].to(device), x[:, 1:].to(device)


def _expected(dispatch: str, capacity: bool, n_layers: int, n_experts: int) -> int:
    if dispatch == "loop":  # the oracle: one torch.where per expert
        return n_experts * n_layers
    return (1 if capacity else HOST_SYNCS_PER_LAYER[dispatch]) * n_layers


@pytest.mark.parametrize("capacity", [False, True], ids=["dropless", "capacity"])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "fused_loop", "padded_bmm", "loop"])
def test_host_syncs_per_training_step(dispatch, capacity):
    from moeforge.runtime._experts import grouped_mm_supported

    if dispatch == "grouped_mm" and not grouped_mm_supported(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU")
    model, x, y = _model(dispatch, ("moe.capacity_factor=0.5",) if capacity else ())
    moe_layers = model.moe_layers()
    E = moe_layers[0][1].n_routed
    _step(model, x, y)  # warm up (lazy inits, probes)
    with count_host_syncs() as seen:
        _step(model, x, y)
    assert sum(seen.values()) == _expected(dispatch, capacity, len(moe_layers), E), dict(seen)
    assert all("_experts.py" in where for where in seen), dict(seen)  # none in layers, losses or backward


def test_counter_sees_every_kind_of_sync():
    t = torch.arange(6)
    with count_host_syncs() as seen:
        t.sum().item(), t.tolist(), int(t[0]), bool(t.any()), t.cpu(), t.numpy()
        torch.where(t > 2), t[t > 2], torch.bincount(t), t.unique()
        torch.zeros(6, dtype=torch.int64).scatter_add_(0, t, torch.ones_like(t))  # not a sync
    kinds = Counter(k.split(" at ")[0] for k in seen.elements())
    assert kinds == Counter(
        {"_local_scalar_dense": 3, "tolist": 1, "cpu": 1, "numpy": 1, "nonzero": 1, "index": 1, "bincount": 1}
        | {"_unique2": 1}
    ), kinds


def _cuda_syncs(model, x, y) -> list[str]:
    """Messages of the syncs that set_sync_debug_mode reports in one bf16 training step (after a warmup)."""
    from benchmarks.gpu_check import cuda_sync_messages

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _step(model, x, y)

    return cuda_sync_messages(step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm", "fused_loop"])
def test_cuda_host_syncs_per_training_step(dispatch):
    """The MoE layers' syncs are the step's minus those of the same model with dense FFNs: layers outside
    the MoE may sync inside torch on CUDA (the embedding's backward reads a segment count, for one)."""
    from moeforge.runtime._experts import grouped_mm_supported

    if dispatch == "grouped_mm" and not grouped_mm_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run on this GPU in bf16")
    model, x, y = _model(dispatch, device="cuda")
    dense, _, _ = _model(dispatch, ("moe=null",), device="cuda")
    moe_syncs, base_syncs = _cuda_syncs(model, x, y), _cuda_syncs(dense, x, y)
    n_layers = len(model.moe_layers())
    assert len(moe_syncs) - len(base_syncs) == _expected(dispatch, False, n_layers, 8), (
        moe_syncs,
        base_syncs,
    )
