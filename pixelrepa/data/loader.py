"""The training DataLoader: sharded, seeded, epoch-aware.

`make_loader` always samples through a `DistributedSampler` (one replica when
`world_size == 1`), so the order is a function of (seed, epoch) and each rank reads a
disjoint shard. Call `loader.set_epoch(epoch)` before each epoch (with `start_batch=k` to
resume mid-epoch: the first k batches of that epoch's order are skipped). Batches are
(uint8 images (N, 3, H, W), int64 labels); `batch_size` is per rank.

Datasets with a `set_epoch` method (the folder data sets) receive `(index, epoch)` keys
from the sampler, so epoch-seeded augmentation (flips) follows the epoch even inside
persistent worker processes, whose copy of the dataset never sees `set_epoch` calls.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way into an epoch's order (`start` indices)."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


class EpochTaggedSampler(ResumableSampler):
    """A ResumableSampler that yields (index, epoch) instead of index."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())


class EpochDataLoader(DataLoader):
    """A DataLoader with `set_epoch`, passed on to its sampler."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_batch * self.batch_size


def make_loader(dataset: Dataset, batch_size: int, *, num_workers: int, seed: int, rank: int = 0,
                world_size: int = 1, drop_last: bool = True, shuffle: bool = True) -> EpochDataLoader:
    """A loader over this rank's shard of `dataset`.

    `drop_last=True` drops both the tail that does not split evenly across ranks (shards
    stay disjoint) and the last incomplete batch; `drop_last=False` pads the shards by
    repeating indices (every rank runs the same number of steps) and keeps the last batch.
    Workers persist across epochs when `num_workers > 0`; memory is pinned only with CUDA.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    sampler_type = EpochTaggedSampler if hasattr(dataset, "set_epoch") else ResumableSampler
    sampler = sampler_type(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                           drop_last=drop_last)
    return EpochDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                           persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                           drop_last=drop_last)
