"""MoE load metrics: how many routed tokens each expert of each MoE layer received during training.

Legend: E routed experts of one layer.

Counting is cheap: after each training forward, `LoadTracker.update()` adds every MoE layer's
`experts.last_counts_E` (written by `moeforge.runtime.Experts` on each forward) into a device-resident int64
accumulator, with no host sync. Where a layer's experts do not record counts, a forward hook on its router
recomputes them from the router logits (top-k of the scores, the same choice the layer makes).

Two accumulators per layer: `window` (since the last `window_stats()` call, for metrics.jsonl) and `total`
(the whole run, for the summary; saved in checkpoints so a resumed run keeps counting). Capacity mode's
dropped fraction is kept the same way, as running sums on the device (window and run), so memory stays
flat however long the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._experts import count_per_expert


def load_stats(counts_E: torch.Tensor) -> dict[str, Any]:
    """Summary of one layer's routed-token counts per expert.

    Returns:
        tokens_per_expert: the counts; tokens: their sum (token-expert pairs); max_over_mean: the busiest
        expert's load relative to a perfectly even split; cv: coefficient of variation (std / mean,
        population std); dead: experts that received no token.
    """
    c = counts_E.detach().to("cpu", torch.float64)
    total = float(c.sum())
    mean = total / max(c.numel(), 1)
    return {
        "tokens_per_expert": [int(v) for v in c.tolist()],
        "tokens": int(total),
        "max_over_mean": float(c.max()) / mean if mean > 0 else None,
        "cv": float(c.std(unbiased=False)) / mean if mean > 0 else None,
        "dead": int((c == 0).sum()),
    }


class LoadTracker:
    """Accumulates routed-token counts per expert for every MoE layer of a model.

    Args:
        model: anything with `moe_layers()` -> [(layer_index, moe_module)], where `moe_module.experts` is a
            `moeforge.runtime.Experts` (or has `router` and `top_k` for the hook fallback). A model without the method
            or without MoE layers gives an empty tracker.
    """

    def __init__(self, model: nn.Module):
        moe_layers = getattr(model, "moe_layers", None)
        self.layers: list[tuple[int, nn.Module]] = list(moe_layers()) if callable(moe_layers) else []
        self._hooked: dict[int, torch.Tensor | None] = {}
        self._handles: list[RemovableHandle] = []
        self.total: dict[int, torch.Tensor] = {}
        self.window: dict[int, torch.Tensor] = {}
        # Capacity mode: sum of the per-forward dropped fractions and how many forwards added to it, since the
        # last window and over this process's whole run (not checkpointed); fixed size, reset when read.
        self._dropped: dict[int, tuple[torch.Tensor, int]] = {}
        self._dropped_run: dict[int, tuple[torch.Tensor, int]] = {}
        for i, moe in self.layers:
            if not hasattr(moe.get_submodule("experts"), "last_counts_E"):
                self._hooked[i] = None
                top_k = moe.top_k
                assert isinstance(top_k, int), f"MoE layer {i}: top_k must be an int for the router hook"
                router = moe.get_submodule("router")
                self._handles.append(router.register_forward_hook(self._router_hook(i, top_k)))

    def _router_hook(self, i: int, top_k: int) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: Any, logits_TE: torch.Tensor) -> None:
            idx_TK = logits_TE.detach().topk(top_k, dim=-1).indices  # softmax is monotone: same top-k
            self._hooked[i] = count_per_expert(idx_TK, logits_TE.shape[-1])  # no host sync

        return hook

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def _last_counts(self, i: int, moe: nn.Module) -> torch.Tensor | None:
        if i in self._hooked:
            return self._hooked[i]
        counts_E = getattr(moe.get_submodule("experts"), "last_counts_E", None)
        return counts_E if isinstance(counts_E, torch.Tensor) else None

    def update(self) -> None:
        """Add the counts of the latest forward (call once after each training forward)."""
        for i, moe in self.layers:
            c = self._last_counts(i, moe)
            if c is None:
                continue
            c = c.detach().to(torch.int64)
            if i not in self.total:
                self.total[i] = torch.zeros_like(c)
            if i not in self.window:
                self.window[i] = torch.zeros_like(c)
            self.total[i] += c
            self.window[i] += c
            dropped = getattr(moe.experts, "last_dropped_fraction", None)
            if getattr(moe.experts, "capacity_factor", None) is not None and dropped is not None:
                d = dropped.detach().float().reshape(())
                for acc in (self._dropped, self._dropped_run):
                    if i in acc:
                        s, n = acc[i]
                        acc[i] = (s.add_(d), n + 1)  # in place: no new tensor per step
                    else:
                        acc[i] = (d.clone(), 1)

    def window_stats(self) -> dict[str, dict[str, Any]]:
        """Per-layer stats of the counts since the previous call (which it resets), keyed by layer index."""
        out = {str(i): _compact(load_stats(c)) for i, c in sorted(self.window.items())}
        for i, (s, n) in self._dropped.items():
            if n and str(i) in out:
                out[str(i)]["dropped_fraction"] = float(s) / n
        self.window = {}
        self._dropped = {}
        return out

    def summary(self) -> dict[str, Any]:
        """Per-layer stats over the whole run (tokens per expert included) and the worst layer's figures."""
        layers = {str(i): load_stats(c) for i, c in sorted(self.total.items())}
        for i, (s, n) in self._dropped_run.items():
            if n and str(i) in layers:
                layers[str(i)]["dropped_fraction"] = float(s) / n
        if not layers:
            return {"layers": {}}
        cvs = [s["cv"] for s in layers.values() if s["cv"] is not None]
        mom = [s["max_over_mean"] for s in layers.values() if s["max_over_mean"] is not None]
        return {
            "layers": layers,
            "max_cv": max(cvs) if cvs else None,
            "max_over_mean": max(mom) if mom else None,
            "dead_experts": sum(s["dead"] for s in layers.values()),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The run totals, for a checkpoint."""
        return {f"load.{i}": c.detach().cpu() for i, c in self.total.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        for key, c in tensors.items():
            if key.startswith("load."):
                self.total[int(key.split(".", 1)[1])] = c.to(device, torch.int64)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _compact(stats: dict[str, Any]) -> dict[str, Any]:
    # metrics.jsonl lines stay short: rounded figures; counts per expert only in the summary
    out = {k: v for k, v in stats.items() if k != "tokens_per_expert"}
    for k in ("max_over_mean", "cv"):
        if out[k] is not None:
            out[k] = round(out[k], 4)
    return out
