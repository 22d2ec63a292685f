"""Data-loading throughput: an image folder of JPEGs against the packed format of the same images.

Builds a temporary ImageNet-layout folder (foolbox's 20 ImageNet 512x512 JPEGs copied round
robin into 10 class folders; synthetic 500x375 JPEGs when foolbox is absent), packs it at each
size with `pack_folder`, then reads one and the other through `make_loader` (same batch size,
workers, flips): ImageFolderDataset decodes and crops every image; PackedDataset copies uint8
pixels out of a memory map. A third row reads the pack with one gather per batch.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from pixelrepa.data.folder import ImageFolderDataset
from pixelrepa.data.loader import make_loader
from pixelrepa.data.packed import PackedDataset, pack_folder

CLASSES = 10


def make_jpeg_tree(root: Path, count: int) -> str:
    """`count` JPEGs in CLASSES class folders; returns where their content comes from."""
    spec = importlib.util.find_spec("foolbox")  # locating the package does not import it
    sources = sorted(Path(list(spec.submodule_search_locations)[0], "data").glob("imagenet_*.jpg")) if spec else []
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
    if sources:
        for i in range(count):
            shutil.copyfile(sources[i % len(sources)], root / f"class{i % CLASSES:02d}" / f"{i:05d}.jpg")
        return f"foolbox's {len(sources)} ImageNet JPEGs (512x512), copied"
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 500)[None, :, None] * np.linspace(0, 1, 375)[:, None, None]
    for i in range(count):
        pixels = ramp * rng.integers(0, 256, 3) + rng.normal(0, 20, (375, 500, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            root / f"class{i % CLASSES:02d}" / f"{i:05d}.jpg", quality=90)
    return "synthetic 500x375 JPEGs (foolbox not installed)"


class BatchView(torch.utils.data.Dataset):
    """Indexed by a list of indices: one gather from the memory map per batch (no flips)."""

    def __init__(self, dataset: PackedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        images = np.ascontiguousarray(self.dataset.images[indices].transpose(0, 3, 1, 2))
        return torch.from_numpy(images), torch.from_numpy(self.dataset.labels[indices])


def batch_loader(dataset: PackedDataset, batch_size: int, workers: int) -> DataLoader:
    sampler = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), batch_size, True)
    return DataLoader(BatchView(dataset), batch_size=None, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0)


def images_per_second(loader, epochs: int, min_seconds: float) -> float:
    """Images per second over at least `epochs` epochs and `min_seconds`, after one warm-up epoch
    (worker start-up). The epoch is not advanced: the order and flips repeat, the work does not change."""
    for _ in loader:
        pass
    count, epoch, start = 0, 0, time.perf_counter()
    while epoch < epochs or time.perf_counter() - start < min_seconds:
        epoch += 1
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="JPEG files in the folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers and packing processes")
    parser.add_argument("--epochs", type=int, default=2, help="least timed epochs (after one warm-up epoch)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="least timed seconds per row")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine   {platform.machine()}, {cores} usable cores of {os.cpu_count()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"software  python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"pillow {Image.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "folder"
        origin = make_jpeg_tree(tree, args.images)
        megabytes = sum(f.stat().st_size for f in tree.rglob("*.jpg")) / 2**20
        print(f"data      {args.images} files ({megabytes:.1f} MiB), {origin}")
        print(f"loader    make_loader, batch {args.batch_size}, {args.workers} workers, flips on, "
              f"timed over >= {args.epochs} epochs and >= {args.min_seconds:g} s after 1 warm-up epoch; "
              "all files in the page cache\n")
        print(f"{'size':>5}  {'reader':<30} {'img/s':>9}  {'vs folder':>9}")
        for size in args.sizes:
            pack = Path(tmp) / f"pack{size}"
            start = time.perf_counter()
            pack_folder(tree, pack, size, workers=args.workers)
            packing = args.images / (time.perf_counter() - start)
            megabytes = (pack / "images.u8").stat().st_size / 2**20
            packed = PackedDataset(pack, hflip=True)
            rows = [  # loaders are built one at a time: a row's workers end before the next row starts
                ("folder (JPEG decode + crop)",
                 lambda: make_loader(ImageFolderDataset(tree, size, hflip=True), args.batch_size,
                                     num_workers=args.workers, seed=0)),
                ("packed, item by item",
                 lambda: make_loader(packed, args.batch_size, num_workers=args.workers, seed=0)),
                ("packed, one gather per batch", lambda: batch_loader(packed, args.batch_size, args.workers)),
            ]
            baseline = None
            for label, build in rows:
                rate = images_per_second(build(), args.epochs, args.min_seconds)
                baseline = baseline or rate
                print(f"{size:>5}  {label:<30} {rate:>9.0f}  {rate / baseline:>8.1f}x")
            print(f"{size:>5}  {'(packing: pack_folder)':<30} {packing:>9.0f}  "
                  f"{'':>9}  {megabytes:.1f} MiB on disk\n")


if __name__ == "__main__":
    main()
