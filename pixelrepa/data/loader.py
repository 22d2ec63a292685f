"""The training DataLoader: sharded, seeded, epoch-aware, the same batches for any process count.

An epoch's order is a permutation of the data set seeded by seed + epoch (as torch's
`DistributedSampler` draws it), cut into batches of `batch_size`; rank r of W reads batches
r, r + W, r + 2W, ... of it. With accumulation over A micro-steps, step s is batches
s*A*W ... (s+1)*A*W - 1, and micro-step m of rank r reads batch (s*A + m)*W + r, its *slot*
m*W + r within the step. Changing the process count (with the same per-rank batch) keeps
every step's batches and every batch's slot, so a run resumed on another number of
processes continues the same run (the trainer draws a micro-batch's noise by its slot).
Call `loader.set_epoch(epoch)` before each epoch (with `start_batch=k` to resume mid-epoch:
this rank's first k batches of that epoch are skipped). Batches are (uint8 images
(N, 3, H, W), int64 labels); `batch_size` is per rank. The tail of an epoch that does not
fill a batch on every rank is dropped.

Datasets with a `set_epoch` method (the folder data sets) receive `(index, epoch)` keys
from the sampler, so epoch-seeded augmentation (flips) follows the epoch even inside
persistent worker processes, whose copy of the dataset never sees `set_epoch` calls.
"""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class BatchShardSampler(Sampler):
    """This rank's indices, batch by batch, in the order described above; `(index, epoch)`
    pairs when `tagged`."""

    def __init__(self, size: int, batch_size: int, *, rank: int, world_size: int, seed: int, tagged: bool):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.tagged = seed, tagged
        self.epoch, self.start = 0, 0

    @property
    def batches(self) -> int:
        """Full batches this rank reads per epoch."""
        return self.size // self.batch_size // self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for k in range(self.start, self.batches):
            first = (k * self.world_size + self.rank) * self.batch_size
            for index in order[first:first + self.batch_size]:
                yield (index, self.epoch) if self.tagged else index

    def __len__(self) -> int:
        return max(0, self.batches - self.start) * self.batch_size


class EpochDataLoader(DataLoader):
    """A DataLoader with `set_epoch`, passed on to its sampler."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)


def _ignore_interrupts(worker: int) -> None:
    """Workers leave a Ctrl-C to the training process, which finishes its step (runlock.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, *, num_workers: int, seed: int, rank: int = 0,
                world_size: int = 1) -> EpochDataLoader:
    """A loader over this rank's batches of `dataset` (see the module docstring).
    Workers persist across epochs when `num_workers > 0`; memory is pinned only with CUDA."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    sampler = BatchShardSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                tagged=hasattr(dataset, "set_epoch"))
    return EpochDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                           persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                           drop_last=True, worker_init_fn=_ignore_interrupts)
