"""Device, precision and kernel choices, made in one place: float32 on CPU, bf16 autocast on
GPU with the released dtype flow (SPEC 7b); attention implementation, oneDNN linears on the
CPU, torch.compile and the target encoder's memory format as `KernelConfig` says (issue 7)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Iterable

import torch
from torch import nn

from pixelrepa.config import KernelConfig
from pixelrepa.models.layers import set_attention_impl
from pixelrepa.models.onednn import use_onednn_linears


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device):
    """bf16 autocast on GPU; float32 (autocast disabled) on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def cpp_compiler_found() -> bool:
    """Whether the C++ compiler that inductor calls for CPU code is on the PATH."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")) is not None


def resolve_compile(kernels: KernelConfig, device: torch.device, train_steps: int | None = None) -> str:
    """'auto' -> 'model' on a GPU; on the CPU 'model' for a training run of at least
    `kernels.cpu_compile_min_steps` steps (`train_steps`; None: not a training run) when a
    C++ compiler is found, else 'none'. Other modes as given."""
    if kernels.compile != "auto":
        return kernels.compile
    if device.type == "cuda":
        return "model"
    long_run = train_steps is not None and train_steps >= kernels.cpu_compile_min_steps
    return "model" if long_run and cpp_compiler_found() else "none"


def kernels_for_run(kernels: KernelConfig, device: torch.device, train_steps: int | None) -> KernelConfig:
    """`kernels` with `compile` resolved once for a run of `train_steps` steps, so that the
    model and the target encoder follow the same decision."""
    return dataclasses.replace(kernels, compile=resolve_compile(kernels, device, train_steps))


def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it ('GenuineIntel', 'AuthenticAMD', ...); '' where
    /proc/cpuinfo is not there (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_cpu_linear(kernels: KernelConfig) -> str:
    """'onednn' or 'aten' for `kernels.cpu_linear`; 'auto' takes oneDNN only on AMD CPUs, where
    MKL's sgemm runs its AVX2 path at about half oneDNN's rate (on Intel CPUs MKL is as fast or
    faster: docs/performance.md, section 3). A property of the machine, so a run resumed on the
    same machine computes with the same kernels."""
    if kernels.cpu_linear != "auto":
        return kernels.cpu_linear
    return "onednn" if cpu_vendor() == "AuthenticAMD" else "aten"


def apply_kernels(module: nn.Module, blocks: Iterable[nn.Module], kernels: KernelConfig, device: torch.device,
                  sampling: bool = False) -> None:
    """In place, keeping parameter names: the attention implementation, oneDNN linears on the
    CPU ('onednn'), then torch.compile of `module` as a whole ('model') or of each of `blocks`
    ('blocks'). For sampling on a GPU with `cuda_graphs`, the compiled code is captured in
    CUDA graphs."""
    set_attention_impl(module, kernels.attention)
    if device.type == "cpu" and resolve_cpu_linear(kernels) == "onednn":
        use_onednn_linears(module)
    mode = resolve_compile(kernels, device)
    options = {"mode": "reduce-overhead"} if sampling and kernels.cuda_graphs and device.type == "cuda" else {}
    if mode == "model":
        module.compile(**options)
    elif mode == "blocks":
        for block in blocks:
            block.compile(**options)


def prepare_encoder(encoder: nn.Module, kernels: KernelConfig, device: torch.device) -> nn.Module:
    """The frozen target encoder with `kernels`' choices, in place: channels-last weights
    (`encoder_channels_last`), oneDNN linears on the CPU, and torch.compile of the whole
    encoder where `compile` resolves to 'model' (see `kernels_for_run`; 'blocks' compiles only
    the backbone's blocks, so the encoder stays eager)."""
    if kernels.encoder_channels_last:
        encoder.to(memory_format=torch.channels_last)
    apply_kernels(encoder, [], kernels, device)
    return encoder
