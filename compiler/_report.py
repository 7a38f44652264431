"""The report of a spec as plain data (JSON for tools); the CLI renders it for people."""

from __future__ import annotations

from typing import Any

from ._accounting import COMPONENTS, account, memory
from ._spec import ModelSpec


def report_dict(spec: ModelSpec, dtype: str = "bf16", causal: bool = False) -> dict[str, Any]:
    """Everything `moeforge report --json` prints, with exact integers."""
    acc = account(spec, causal=causal)
    mem = memory(spec, dtype)
    d = spec.moe_derived
    derived: dict[str, Any] | None = None
    if d is not None:
        per_layer = {
            "routed_experts": d.routed_experts,
            "shared_experts": d.shared_experts,
            "top_k": d.top_k,
            "expert_hidden": d.expert_hidden,
            "shared_hidden": d.shared_hidden,
            "activated_experts": d.activated_experts,
            "m": d.m,
        }
        derived = {
            **per_layer,
            "moe_layers": list(spec.moe_layers),
            "layers": [{"layer": i, **per_layer} for i in spec.moe_layers],
        }
    return {
        "name": spec.name,
        "params": {
            "total": acc.params_total,
            "activated": acc.params_activated,
            "non_embedding": acc.params_non_embedding,
            "activated_non_embedding": acc.params_activated_non_embedding,
            "embedding": acc.params_embedding,
            "by_component": {c: {"total": acc.params[c], "activated": acc.activated[c]} for c in COMPONENTS},
            "by_layer": [
                {
                    "layer": lc.index,
                    "kind": lc.kind,
                    "total": sum(lc.params.values()),
                    "activated": sum(lc.activated.values()),
                }
                for lc in acc.layers
            ],
        },
        "flops": {
            "seq_len": spec.seq_len,
            "causal": causal,
            "forward_per_token": acc.forward_flops_per_token,
            "train_per_token": acc.train_flops_per_token,
            "train_per_sequence": acc.train_flops_per_sequence,
            "six_n_per_token": acc.six_n,
            "by_component": dict(acc.forward_flops),
            "by_layer": [
                {"layer": lc.index, "kind": lc.kind, "forward_per_token": sum(lc.forward_flops.values())}
                for lc in acc.layers
            ],
        },
        "memory": {
            "dtype": dtype,
            "weights_bytes": mem.weights_bytes,
            "train_state_bytes": mem.train_state_bytes,
            "activation_bytes_per_token": mem.activation_bytes_per_token,
        },
        "derived": derived,
        "spec": spec.model_dump(mode="json"),
    }
