"""Cached encoder targets (`align.target_cache`): the frozen encoder's features of every image
of a pack, computed once and read by the loader with the images.

A cache folder holds
- `targets.bin`: (N, orientations, T, C) in `align.target_cache_dtype`, row i = pack item i;
  orientation 1 is the horizontally flipped image (present when `data.hflip`), so a flipped
  item reads the features of exactly the image the step trains on;
- `manifest.json`: what the targets are of (format, the encoder config, a digest of the
  encoder's weights, the pack's image digest and count, grid, channels, dtype, orientations)
  and `complete`. A cache whose record differs from the run's is refused, naming the fields.

Building is batched on the training device, split across torchrun ranks in fixed chunks of
`CHUNK_IMAGES` (rank r takes chunks r, r + W, ...) and resumable: a chunk is flushed to disk
before its marker `done/<chunk>` is written, and a re-run (at any world size) computes only
the chunks without one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from pixelrepa.config import RunConfig
from pixelrepa.data.packed import IMAGES, TARGET_CACHES, PackedDataset
from pixelrepa.data.transforms import to_model_range
from pixelrepa.files import write_text_atomic
from pixelrepa.distributed import World
from pixelrepa.training.runlock import Preempted, StopSignals

logger = logging.getLogger("pixelrepa.train")

FORMAT = "pixelrepa-targets/1"
TARGETS, MANIFEST, DONE = "targets.bin", "manifest.json", "done"
CHUNK_IMAGES = 1024
_STORAGE = {"float32": (np.float32, torch.float32), "bfloat16": (np.int16, torch.bfloat16)}


def cache_folder(config: RunConfig, pack: Path) -> Path:
    """Where `align.target_cache` keeps the targets of `pack`."""
    if config.align.target_cache != "auto":
        return Path(config.align.target_cache)
    enc, grid = config.align.encoder, config.model.grid_size
    return pack / TARGET_CACHES / f"{enc.name}-{enc.img_size}px-stage{enc.stage}-grid{grid}"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state (its identity)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_record(config: RunConfig, pack: PackedDataset, encoder: nn.Module) -> dict:
    """Everything the cached targets depend on, as `manifest.json` records it."""
    grid = config.model.grid_size
    return {
        "format": FORMAT,
        "encoder": dataclasses.asdict(config.align.encoder),
        "encoder_weights_sha256": weights_digest(encoder),
        "pack_images_sha256": pack.manifest["sha256"][IMAGES],
        "count": len(pack),
        "grid": [grid, grid],
        "channels": config.align.encoder.feature_dim,
        "dtype": config.align.target_cache_dtype,
        "orientations": 2 if pack.hflip else 1,
    }


def _shape(record: dict) -> tuple[int, int, int, int]:
    return record["count"], record["orientations"], record["grid"][0] * record["grid"][1], record["channels"]


def _open(folder: Path, record: dict, mode: str) -> np.memmap:
    return np.memmap(folder / TARGETS, dtype=_STORAGE[record["dtype"]][0], mode=mode, shape=_shape(record))


def _check_record(folder: Path, found: dict, expected: dict) -> None:
    differing = [key for key in expected if found.get(key) != expected[key]]
    if differing:
        details = "; ".join(f"{key}: cache {found.get(key)!r}, run {expected[key]!r}" for key in differing)
        raise ValueError(f"the target cache {folder} was made for other targets ({details}); delete it, or point "
                         "align.target_cache at another folder ('auto' names one by encoder, resolution and grid)")


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete the folder {folder} to rebuild the cache") from None


def _barrier(world: World) -> None:
    if world.world_size > 1:
        torch_dist.barrier()


def build_target_cache(config: RunConfig, pack: PackedDataset, encoder: nn.Module, world: World,
                       batch_size: int, progress: bool = True, stop: StopSignals | None = None) -> tuple[Path, dict]:
    """Make (or finish, or check) the cache of `pack`'s targets; returns its folder and record.
    A signal `stop` records ends the build after the chunk at hand: `Preempted` is raised on every
    rank and the finished chunks are kept for the next run."""
    folder = cache_folder(config, pack.path)
    expected = cache_record(config, pack, encoder)
    if world.is_main:
        found = _read_manifest(folder)
        if found is None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / DONE).mkdir(exist_ok=True)
            size = int(np.prod(_shape(expected))) * np.dtype(_STORAGE[expected["dtype"]][0]).itemsize
            with open(folder / TARGETS, "wb") as f:
                f.truncate(size)
            write_text_atomic(folder / MANIFEST, json.dumps({**expected, "complete": False}, indent=1))
        else:
            _check_record(folder, found, expected)
    _barrier(world)
    record = {**expected, "complete": _read_manifest(folder).get("complete", False)}
    if not record["complete"]:
        _fill_chunks(folder, record, pack, encoder, config, world, batch_size, progress, stop)
        _barrier(world)
        signal_name = stop.requested() if stop is not None else None  # collective: every rank asks once
        if signal_name:
            raise Preempted(signal_name, None, None, f"building the encoder target cache {folder} (its finished "
                                                     "chunks are kept)")
        if world.is_main:
            missing = [c for c in range(_num_chunks(record)) if not (folder / DONE / str(c)).is_file()]
            if missing:
                raise RuntimeError(f"target cache {folder}: chunks {missing[:5]} were not written; run again to finish")
            record["complete"] = True
            write_text_atomic(folder / MANIFEST, json.dumps(record, indent=1))
            for marker in (folder / DONE).iterdir():
                marker.unlink()
            (folder / DONE).rmdir()
        _barrier(world)
    expected_bytes = int(np.prod(_shape(record))) * np.dtype(_STORAGE[record["dtype"]][0]).itemsize
    if (folder / TARGETS).stat().st_size != expected_bytes:
        raise ValueError(f"{folder / TARGETS} is {(folder / TARGETS).stat().st_size} bytes, {expected_bytes} expected; "
                         f"delete the folder {folder} to rebuild the cache")
    return folder, record


def _num_chunks(record: dict) -> int:
    return -(-record["count"] // CHUNK_IMAGES)


def _fill_chunks(folder: Path, record: dict, pack: PackedDataset, encoder: nn.Module, config: RunConfig,
                 world: World, batch_size: int, progress: bool, stop: StopSignals | None = None) -> None:
    from pixelrepa.device import autocast_for

    mine = [c for c in range(world.rank, _num_chunks(record), world.world_size)
            if not (folder / DONE / str(c)).is_file()]
    if not mine:
        return
    targets = _open(folder, record, "r+")
    grid = tuple(record["grid"])
    storage = _STORAGE[record["dtype"]][1]
    device = world.device
    bar = tqdm(total=sum(min(CHUNK_IMAGES, record["count"] - c * CHUNK_IMAGES) for c in mine),
               disable=not (progress and world.is_main), desc="encoder targets", unit="img", dynamic_ncols=True)
    for chunk in mine:
        if stop is not None and stop.received:
            break
        chunk_end = min((chunk + 1) * CHUNK_IMAGES, record["count"])
        for start in range(chunk * CHUNK_IMAGES, chunk_end, batch_size):
            end = min(start + batch_size, chunk_end)
            images = torch.from_numpy(np.ascontiguousarray(pack.images[start:end].transpose(0, 3, 1, 2)))
            x = to_model_range(images.to(device))
            for orientation in range(record["orientations"]):
                view = x.flip(-1) if orientation else x
                with autocast_for(device):
                    features = encoder(view, grid)
                stored = features.to(storage).cpu()
                targets[start:end, orientation] = (stored.view(torch.int16) if storage == torch.bfloat16
                                                    else stored).numpy()
            bar.update(end - start)
        targets.flush()
        (folder / DONE / str(chunk)).touch()
    bar.close()
    del targets


class PackWithTargets(Dataset):
    """A pack's items with their cached targets: (image, label, target (T, C)), the target of
    the orientation the item is served in (the pack's flip draw for (index, epoch))."""

    def __init__(self, pack: PackedDataset, folder: Path, record: dict):
        self.pack, self.folder, self.record = pack, folder, record
        self._targets: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_targets": None}  # workers map the file themselves

    def __len__(self) -> int:
        return len(self.pack)

    def set_epoch(self, epoch: int) -> None:
        self.pack.set_epoch(epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int, Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, self.pack.epoch)
        image, label = self.pack[key]
        if self._targets is None:
            self._targets = _open(self.folder, self.record, "r")
        orientation = int(self.pack.hflip and self.pack.flipped(index % len(self.pack), epoch))
        target = torch.from_numpy(np.array(self._targets[index, orientation]))
        if self.record["dtype"] == "bfloat16":
            target = target.view(torch.bfloat16)
        return image, label, target


def with_target_cache(config: RunConfig, dataset: Dataset, encoder: nn.Module, world: World,
                      progress: bool = True, stop: StopSignals | None = None) -> PackWithTargets:
    """`dataset` (a pack) with its targets, building the cache first where needed (`stop`: see
    `build_target_cache`)."""
    if not isinstance(dataset, PackedDataset):
        raise ValueError(f"align.target_cache needs a packed data set, but data.source {config.data.source!r} is "
                         "an image folder: pack it once with `pixelrepa data pack SRC DST` and train on DST")
    folder, record = build_target_cache(config, dataset, encoder, world, batch_size=config.train.per_device_batch,
                                        progress=progress, stop=stop)
    if world.is_main:
        logger.info("encoder targets from the cache %s (%d images x %d orientations)", folder, record["count"],
                    record["orientations"])
    return PackWithTargets(dataset, folder, record)
