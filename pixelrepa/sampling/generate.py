"""Generating images reproducibly: image k depends only on (model, sampler settings, seed, k).

Its noise comes from `pixelrepa.rng.image_generator(seed, k)` and its label from a
`ClassLayout`, so the same k gives the same image (up to float rounding of the batched
network) whatever the batch size or the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from pixelrepa.config import RunConfig
from pixelrepa.data.transforms import to_uint8
from pixelrepa.device import autocast_for
from pixelrepa.rng import image_generator
from pixelrepa.sampling.solvers import sample


@dataclass(frozen=True)
class ClassLayout:
    """Image k has class `classes[(k // per_class) % len(classes)]`: class-major blocks."""

    classes: tuple[int, ...]
    per_class: int

    def __len__(self) -> int:
        return len(self.classes) * self.per_class

    def __call__(self, index: int) -> int:
        return self.classes[(index // self.per_class) % len(self.classes)]


def class_layout(num_classes: int, classes: Iterable[int] | None = None, per_class: int = 50) -> ClassLayout:
    """`per_class` images of each of `classes` (default: every class), checked against the model."""
    classes = tuple(range(num_classes)) if classes is None else tuple(int(c) for c in classes)
    if not classes:
        raise ValueError("no classes given")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} outside [0, {num_classes}) for this model")
    if per_class < 1:
        raise ValueError(f"per-class count must be >= 1, got {per_class}")
    return ClassLayout(classes, per_class)


def image_noise(config: RunConfig, seed: int, index: int) -> Tensor:
    """The initial noise of image `index`: float32 (C, H, W) on CPU, times the noise scale."""
    m = config.model
    generator = image_generator(seed, index)
    noise = torch.randn(m.in_channels, m.input_size, m.input_size, generator=generator)
    return noise * config.objective.noise_scale


def generate(net: nn.Module, config: RunConfig, indices: Iterable[int], labels_for: Callable[[int], int],
             batch_size: int, device: torch.device, seed: int = 0,
             guide: nn.Module | None = None) -> Iterator[tuple[list[int], Tensor]]:
    """Sample images `indices` in batches: yields (batch indices, uint8 (n, C, H, W) on CPU); `guide`
    (a weaker model of the same data, see `check_guide`) replaces the unconditional pass."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        noise = torch.stack([image_noise(config, seed, k) for k in batch]).to(device)
        labels = torch.tensor([labels_for(k) for k in batch], device=device)
        with autocast_for(device):
            x = sample(net, noise, labels, config.model.num_classes, config.sampler, config.objective.t_eps,
                       guide=guide)
        yield batch, to_uint8(x).cpu()


def sample_classes(net: nn.Module, config: RunConfig, classes: list[int], per_class: int, seed: int,
                   device: torch.device, batch_size: int = 64, guide: nn.Module | None = None) -> Tensor:
    """uint8 (len(classes) * per_class, C, H, W), class-major: images 0.. of a `sample` run
    with the same classes, per-class count, seed (and guide)."""
    layout = class_layout(config.model.num_classes, classes, per_class)
    images = generate(net, config, range(len(layout)), layout, batch_size, device, seed, guide)
    return torch.cat([x for _, x in images])
