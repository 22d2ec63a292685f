"""Exponential moving averages of the backbone (SPEC 6): two decays, swap-in for sampling."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from pixelrepa.config import EMAConfig


class BackboneEMA:
    """Keeps one shadow copy of the backbone's parameters per decay.

    `update(model)` after each optimiser step; `swapped_in(model, k)` temporarily puts
    EMA k (0-based, 0 = the first decay, used for sampling by default) into the model.
    Buffers (the fixed position table, RoPE tables) are not averaged.
    """

    def __init__(self, model: nn.Module, config: EMAConfig):
        self.config = config
        self.names = [name for name, _ in model.named_parameters()]
        self.shadows: list[list[Tensor]] = [
            [p.detach().clone() for p in model.parameters()] for _ in config.decays
        ]
        self.step = 0

    def decay(self, index: int) -> float:
        """Decay k for the next update; with warm-up, min(d, (1 + step) / (10 + step))."""
        d = self.config.decays[index]
        if self.config.warmup:
            d = min(d, (1 + self.step) / (10 + self.step))
        return d

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        for k, shadow in enumerate(self.shadows):
            torch._foreach_lerp_(shadow, params, 1.0 - self.decay(k))
        self.step += 1

    def state_dict(self, index: int) -> dict[str, Tensor]:
        """EMA k under the model's parameter names."""
        return dict(zip(self.names, self.shadows[index]))

    def load_state_dict(self, index: int, state: dict[str, Tensor]) -> None:
        """Load full tensors (also into FSDP2-sharded shadows; then collective)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA {index + 1} state lacks parameter '{missing[0]}'")
        for dst, name in zip(self.shadows[index], self.names):
            value = state[name].to(dst.device)
            if hasattr(dst, "device_mesh"):  # FSDP2-sharded shadow: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, dst.device_mesh, dst.placements)
            dst.copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, index: int = 0) -> Iterator[nn.Module]:
        """Use EMA `index` inside the block; the live weights are restored afterwards."""
        params = list(model.parameters())
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadows[index]):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
