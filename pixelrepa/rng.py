"""Every seed and random stream in one place: per-step training draws, per-image sampling
noise, and capturing / restoring / preserving the global generators.

Training draws of micro-batch `slot` at `step` come from `step_generator(seed, step, slot)`;
sampled image k from a CPU generator seeded `seed * SEED_STRIDE + k`. Neither touches the
global generators, which only dropout and weight initialisation use; checkpoints carry those
(`capture_rng_state`), and work that must not disturb them runs inside `preserved_rng`.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

SEED_STRIDE = 1_000_003
"""A prime that separates the seeds of consecutive runs: image k of sampling seed s draws from
seed `s * SEED_STRIDE + k`; training seeds are strided by its square (steps) and by it (ranks)."""

MAX_SLOTS = 1024
"""Micro-batches per step (processes x accumulation) that draw distinct noise."""


def step_generator(seed: int, step: int, slot: int, device: torch.device) -> torch.Generator:
    """The generator for one micro-batch's draws, a function of (seed, step, slot); the slot
    (micro-step m of rank r of W: m*W + r, `pixelrepa.data.loader`) names the same images for
    any process count, so the draws do not depend on how the step is split."""
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * SEED_STRIDE**2 + step) * MAX_SLOTS + slot) % 2**63)
    return generator


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sampled image `index` (its noise, and the probes' draws for it)."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + index)


def reseed_global(seed: int, step: int, rank: int) -> None:
    """Seed the global torch generator from (seed, step, rank): a resume on another process count."""
    torch.manual_seed((seed * SEED_STRIDE + step) * SEED_STRIDE + rank)


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA RNG states, in weights-only-loadable types."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices present
    (none without CUDA)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({"bit_generator": npy["bit_generator"],
                         "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


@contextmanager
def preserved_rng(device: torch.device | str = "cpu"):
    """Run the block and restore torch's CPU generator (and `device`'s, on CUDA), numpy's global
    state and Python's `random`: what happens inside leaves the training streams where they were."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
