"""Device and precision choices, made in one place: float32 on CPU, bf16 autocast on GPU."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device):
    """bf16 autocast on GPU; float32 (autocast disabled) on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
