"""Device, precision and kernel choices, made in one place: float32 on CPU, bf16 autocast on
GPU; oneDNN linears on the CPU and torch.compile as `KernelConfig` says (issue 7)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pixelrepa.config import KernelConfig
from pixelrepa.models.onednn import use_onednn_linears


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device):
    """bf16 autocast on GPU; float32 (autocast disabled) on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def resolve_compile(kernels: KernelConfig, device: torch.device) -> str:
    """'auto' -> 'model' on a GPU, 'none' on the CPU; other modes as given."""
    if kernels.compile == "auto":
        return "model" if device.type == "cuda" else "none"
    return kernels.compile


def apply_kernels(module: nn.Module, blocks: Iterable[nn.Module], kernels: KernelConfig, device: torch.device,
                  sampling: bool = False) -> None:
    """In place, keeping parameter names: oneDNN linears on the CPU ('onednn'), then
    torch.compile of `module` as a whole ('model') or of each of `blocks` ('blocks').
    For sampling on a GPU with `cuda_graphs`, the compiled code is captured in CUDA graphs."""
    if device.type == "cpu" and kernels.cpu_linear == "onednn":
        use_onednn_linears(module)
    mode = resolve_compile(kernels, device)
    options = {"mode": "reduce-overhead"} if sampling and kernels.cuda_graphs and device.type == "cuda" else {}
    if mode == "model":
        module.compile(**options)
    elif mode == "blocks":
        for block in blocks:
            block.compile(**options)
