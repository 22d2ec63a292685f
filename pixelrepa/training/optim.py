"""The optimizer (SPEC 6): AdamW over the trainable parameters, fused kernel by default."""

from __future__ import annotations

import torch

from pixelrepa.config import RunConfig


def make_optimizer(module: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas and weight decay at the peak lr (the schedule sets lr per
    step). `kernels.fused_optimizer`: the fused kernel; else torch's default, as released."""
    params = [p for p in module.parameters() if p.requires_grad]
    fast = {"fused": True} if config.kernels.fused_optimizer else {}
    return torch.optim.AdamW(params, lr=config.optim.peak_lr, betas=config.optim.betas,
                             weight_decay=config.optim.weight_decay, **fast)
