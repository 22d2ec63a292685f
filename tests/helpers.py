"""Shared test utilities (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Non-zero random weights everywhere (the init zeroes adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module
