"""The optimizer and its learning-rate schedule (SPEC 6): AdamW over the trainable parameters,
fused kernel by default; per-iteration linear warm-up from lr 0, then constant or cosine."""

from __future__ import annotations

import math
from typing import Any

import torch

from pixelrepa.config import OptimConfig, RunConfig


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """One group without weight decay; with weight decay > 0, the released split: every 1-D
    parameter and every `.bias` in a no-decay group first, the rest decayed (SPEC 6)."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": [p for _, p in named], "weight_decay": 0.0}]
    exempt = [p.ndim == 1 or name.endswith(".bias") for name, p in named]
    return [{"params": [p for (_, p), skip in zip(named, exempt) if skip], "weight_decay": 0.0},
            {"params": [p for (_, p), skip in zip(named, exempt) if not skip], "weight_decay": weight_decay}]


def make_optimizer(module: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas at the peak lr (`learning_rate` sets lr per step).
    `kernels.fused_optimizer`: the fused kernel; else torch's default, as released."""
    fast = {"fused": True} if config.kernels.fused_optimizer else {}
    groups = [g for g in parameter_groups(module, config.optim.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=config.optim.peak_lr, betas=config.optim.betas, **fast)


def learning_rate(step: int, optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The lr of optimiser step `step` (0-based), as released (SPEC 6): with the fractional
    epoch e = epoch + i / steps_per_epoch, lr = peak * e / warmup_epochs during warm-up (the
    first step runs at lr 0), then constant, or a half cosine from peak to min_lr that ends
    at total_steps. `optim.warmup_steps` counts the warm-up in steps instead."""
    epoch, i = divmod(step, steps_per_epoch)
    progress, total = epoch + i / steps_per_epoch, total_steps / steps_per_epoch
    warmup = optim.warmup_epochs
    if optim.warmup_steps is not None:
        progress, total, warmup = float(step), float(total_steps), float(optim.warmup_steps)
    peak = optim.peak_lr
    if progress < warmup:
        return peak * progress / warmup
    if optim.schedule == "constant":
        return peak
    cosine = 1.0 + math.cos(math.pi * (progress - warmup) / max(total - warmup, 1e-12))
    return optim.min_lr + (peak - optim.min_lr) * 0.5 * cosine
