"""The optimizer and its learning rate over a run: AdamW with decay on matrices only, and the schedule
(linear warmup, then cosine to `min_lr_ratio`, or warmup-stable-decay with a 1-sqrt or linear cooldown).

What a run's learning rate is at each step depends only on the config, the fraction done and the tokens
done, so a resumed run, a run on several processes and a branched cooldown (`_branch.py`) all see the same
schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._config import TrainConfig


def lr_at(cfg: TrainConfig, p: float, tokens: int | None = None) -> float:
    """Learning rate at fraction p of the run, `tokens` done (see the module docstring).

    With `warmup_tokens`, the warmup is read from `tokens` (p when tokens is None: a time-only run), so a WSD
    run's warmup and stable phase are the same at every total: only the cooldown, the last `cooldown` of p,
    depends on it.
    """
    p = min(max(p, 0.0), 1.0)
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_tokens is not None and tokens is not None:
        if tokens < cfg.warmup_tokens:
            return cfg.lr * tokens / cfg.warmup_tokens
        warm = p * cfg.warmup_tokens / tokens  # warmup_tokens / total: where the cosine starts
    elif p < cfg.warmup:
        return cfg.lr * p / cfg.warmup
    else:
        warm = cfg.warmup
    if cfg.schedule == "cosine":
        q = (p - warm) / (1 - warm) if warm < 1 else 1.0
        return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * q))
    if not in_cooldown(cfg, p):
        return cfg.lr
    q = (p - (1 - cfg.cooldown)) / cfg.cooldown
    return cfg.lr + (low - cfg.lr) * (math.sqrt(q) if cfg.cooldown_shape == "1-sqrt" else q)


def in_cooldown(cfg: TrainConfig, p: float) -> bool:
    """Whether a WSD run's learning rate after a step that ends at fraction p of the run is in the cooldown.

    The one test the schedule and the branch points (`runtime/_branch.py`) share, so they agree to the bit.
    """
    return cfg.cooldown > 0 and p > 1 - cfg.cooldown


def planned_tokens(cfg: TrainConfig, seq_len: int, train_flops_per_token: int) -> int | None:
    """Tokens the run trains (None for a time-only run)."""
    if cfg.budget_flops is not None:
        return int(cfg.budget_flops // train_flops_per_token)
    if cfg.tokens is not None:
        return int(cfg.tokens)
    if cfg.steps is not None:
        return int(cfg.steps) * cfg.batch_size * seq_len
    return None


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, embedding tables)."""
    no_decay = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            no_decay.add(id(m.weight))
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for p in dict.fromkeys(model.parameters()):  # unique, in registration order
        if not p.requires_grad:
            continue
        (rest if p.dim() < 2 or id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=device.type == "cuda" or None
    )
