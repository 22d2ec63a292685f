"""The demo's single-process loop over an in-memory data set with cached encoder targets.

`trainer.train` is the general run (any data source, torchrun, checkpoints, logs); this
loop serves the offline demo, whose fixed data set lets the encoder targets be computed
once instead of every step. Draws and batch order use the trainer's seeded generators.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from pixelrepa.align.encoders import build_encoder
from pixelrepa.config import KernelConfig, RunConfig
from pixelrepa.data.idx import to_model_range
from pixelrepa.objective import draw_randomness, training_loss
from pixelrepa.training.device import apply_kernels, autocast_for, prepare_encoder
from pixelrepa.training.ema import BackboneEMA
from pixelrepa.training.optim import make_optimizer
from pixelrepa.training.trainer import step_generator


@dataclass
class LoopSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    seed: int = 0
    progress: bool = True


@dataclass
class TrainState:
    net: nn.Module
    head: nn.Module | None
    ema: BackboneEMA
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def eager_kernels(config: RunConfig) -> KernelConfig:
    """The config's kernel choices without compilation: the loop's networks run eagerly."""
    return dataclasses.replace(config.kernels, compile="none")


def build_state(config: RunConfig, net: nn.Module, head: nn.Module | None, lr: float) -> TrainState:
    """Optimizer and EMA for `net` (+ `head`), with the config's CPU linear kernel and AdamW
    kernel. The loop runs eagerly (`kernels.compile` is not applied): between training steps
    the same network also samples, at other shapes, which would recompile it."""
    device = next(net.parameters()).device
    modules = nn.ModuleList([m for m in (net, head) if m is not None])
    apply_kernels(modules, [], eager_kernels(config), device)
    optimizer = make_optimizer(modules, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return TrainState(net=net, head=head, ema=BackboneEMA(net, config.ema), optimizer=optimizer)


def cached_encoder_targets(config: RunConfig, images: Tensor, cache: Path, device: torch.device,
                           batch_size: int = 256) -> Tensor:
    """Encoder features (N, T, C) of uint8 images (N, 3, H, W) on the backbone's token grid, as
    float16, computed once and kept in `cache` (reused while its image count matches)."""
    if cache.is_file():
        cached = load_file(str(cache))["targets"]
        if len(cached) == len(images):
            return cached
    encoder = prepare_encoder(build_encoder(config.align.encoder).to(device), eager_kernels(config), device)
    grid = (config.model.grid_size, config.model.grid_size)
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="encoder targets", unit="batch",
                          dynamic_ncols=True):
            x = to_model_range(images[start:start + batch_size]).to(device)
            chunks.append(encoder(x, grid).to(torch.float16).cpu())
    targets = torch.cat(chunks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    save_file({"targets": targets}, str(tmp))
    tmp.replace(cache)
    return targets


def batch_indices(num_images: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The images of optimiser step `step`: a permutation per epoch drawn from (seed, epoch)."""
    per_epoch = num_images // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_images, generator=step_generator(seed, 0, epoch, 0, torch.device("cpu")))
    return order[position * batch_size:(position + 1) * batch_size]


def train(config: RunConfig, state: TrainState, images: Tensor, labels: Tensor, targets: Tensor | None,
          settings: LoopSettings, on_step: Callable[[TrainState, dict[str, float]], None] | None = None,
          ) -> TrainState:
    """Run `settings.steps` optimiser steps. images: uint8 (N, 3, H, W); targets: (N, T, C)
    cached encoder features of the same images (or None for plain JiT)."""
    device = next(state.net.parameters()).device
    n = len(images)
    if n < settings.batch_size:
        raise ValueError(f"data set has {n} images, fewer than one batch of {settings.batch_size}")
    if config.align.mode != "none" and targets is None:
        raise ValueError(f"alignment mode '{config.align.mode}' needs encoder targets")
    state.net.train()
    if state.head is not None:
        state.head.train()
    bar = tqdm(total=settings.steps, initial=state.step, disable=not settings.progress, unit="step",
               dynamic_ncols=True)
    started, start_step = time.perf_counter(), state.step
    while state.step < settings.steps:
        index = batch_indices(n, settings.batch_size, settings.seed, state.step)
        x = to_model_range(images[index]).to(device, non_blocking=True)
        y = labels[index].to(device)
        target = targets[index].to(device).float() if targets is not None else None

        lr = settings.lr * min(1.0, (state.step + 1) / settings.warmup_steps) if settings.warmup_steps else settings.lr
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        draws = draw_randomness(x, y, config.model.num_classes, config.model.num_patches, config.objective,
                                config.align, step_generator(settings.seed, 0, state.step, 0, device))
        with autocast_for(device):
            losses = training_loss(state.net, state.head, x, draws, config.objective, config.align,
                                   config.tap_block, target)
        if not torch.isfinite(losses["total"]):
            raise FloatingPointError(f"non-finite loss at step {state.step}: "
                                     + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
        state.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        state.optimizer.step()
        state.ema.update(state.net)
        state.step += 1

        record = {k: v.item() for k, v in losses.items()}
        record.update(step=state.step, lr=lr)
        state.history.append(record)
        bar.update(1)
        if state.step % 10 == 0 or state.step == settings.steps:
            rate = (state.step - start_step) * settings.batch_size / (time.perf_counter() - started)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("total", "denoise", "align")}
                            | {"img/s": f"{rate:.0f}"})
        if on_step is not None:
            on_step(state, record)
    bar.close()
    return state

