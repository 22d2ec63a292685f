"""Shared test utilities (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

FIXTURES = Path(os.environ.get("PIXELREPA_PARITY_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-small"))
"""The parity fixtures (SPEC 9); `released/` holds checkpoints in the released layout."""


def load_released(path: Path) -> dict:
    """A released checkpoint-last.pth as a plain dict (weights-only, Namespace allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Non-zero random weights everywhere (the init zeroes adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module
