"""Image files on disk as a uint8 data set: an ImageNet-layout folder.

`ImageFolderDataset(root, size)` reads `root/CLASS/IMAGE` (the ImageNet train layout). Items
are (uint8 (3, size, size), int label): decoded, converted by `to_rgb`, cut by
`adm_center_crop`, optionally flipped.

Files and classes
- Image files are those with extension .jpeg .jpg .png .bmp .webp .tif .tiff, any case,
  directly inside the folder (class folders are not searched recursively). Other files, and
  names starting with "." (e.g. macOS `._x.JPEG`), are ignored without a record.
- An entry with an image name that is not a file (a folder `x.png/`, a broken link) and a
  symlink loop (in a class folder or the root) are left out and recorded in `skipped` with
  the reason.
- Class index = position in the sorted folder names, or in `class_names` when given; those
  must match the folders exactly (ValueError naming the missing and the extra ones).

Bad-input policy
- Unreadable file (corrupt, truncated PNG, not an image under an image extension, zero
  bytes): with `validate=True` (default) the scan opens each file and runs PIL's `verify()`
  (a header read for JPEG, the whole file for PNG); failures are left out, recorded in
  `dataset.skipped` as (path, reason) and logged on the "pixelrepa.data" logger.
  `validate=False` skips that pass (faster start on a big tree you trust).
- A file that still fails to decode when loaded (e.g. a truncated JPEG, which passes
  `verify()`) is replaced by the next index that loads (wrapping around), with its label
  and the requested index's flip draw: deterministic, recorded in `skipped` and logged as
  a warning. The record is made in the
  process that loads it: with DataLoader workers it stays in the worker's copy.
- Grey, palette, RGBA/LA, CMYK, 16-bit and float images: converted by `to_rgb` (alpha is
  dropped, 16-bit is divided by 257); the validating scan counts them by mode in
  `dataset.converted`.
- Images with a short side below `size`: upsampled by ADM's bicubic resize; the validating
  scan lists them in `dataset.upsampled` and logs the count.
- Empty class folder (no readable image): ValueError naming it, since dropping it would shift
  the later class indices and keeping it trains a class with no data;
  `allow_empty_classes=True` keeps the class (and its index) and warns instead.
- No images at all: ValueError naming the root. Missing root: FileNotFoundError.
- `check_num_classes(dataset, num_classes)` compares the data's classes with the model's
  class count before training (ValueError naming both numbers).

Flips
With `hflip=True`, item `index` is mirrored with probability 1/2 by a generator seeded from
(seed, epoch, index): the same triple gives the same image, another epoch redraws. Set the
epoch with `set_epoch`, or index with `(index, epoch)`, which is what the sampler of
`pixelrepa.data.loader.make_loader` passes, so flips follow the epoch inside persistent
worker processes too.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import adm_center_crop, pil_to_uint8, random_hflip, to_rgb

logger = logging.getLogger("pixelrepa.data")

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises on bad files (UnidentifiedImageError is an OSError)."""


def load_image(path: str | Path | BinaryIO, size: int) -> Tensor:
    """Decode, convert to RGB and ADM-center-crop one file (a path or an open binary file): uint8 (3, size, size)."""
    with Image.open(path) as image:
        image.load()
        rgb = to_rgb(image)
    return pil_to_uint8(adm_center_crop(rgb, size))


SYMLINK_LOOP = "a symlink loop"


def image_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files directly inside `folder`, sorted by name (hidden names left out), and the
    (path, reason) of entries named like images that are not files, and of symlink loops."""
    files, unusable = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        problem = _not_a_file(path)
        if path.suffix.lower() in IMAGE_EXTENSIONS and problem is None:
            files.append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS or problem == SYMLINK_LOOP:
            unusable.append((path, problem))
    return files, unusable


def _not_a_file(path: Path) -> str | None:
    """Why `path` is not a regular file (after links), or None when it is one."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return SYMLINK_LOOP
        if path.is_symlink():
            return f"a broken link to {os.readlink(path)}"
        return f"cannot be read: {err.strerror}"
    if stat.S_ISDIR(mode):
        return "a folder, not an image file (class folders are not searched recursively)"
    return None if stat.S_ISREG(mode) else "not a regular file"


class _ImageFiles(Dataset):
    """(path, label) samples with the shared scan, load and flip policy (module docstring)."""

    def __init__(self, root: Path, candidates: list[tuple[Path, int]], size: int, *,
                 hflip: bool, seed: int, validate: bool, unusable: list[tuple[Path, str]]) -> None:
        self.root = root
        self.size = size
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.skipped: list[tuple[Path, str]] = []
        self.converted: Counter[str] = Counter()
        self.upsampled: list[Path] = []
        for path, reason in unusable:
            self._skip(path, reason)
        self.samples = [s for s in candidates if self._inspect(s[0])] if validate else list(candidates)
        self._failed: set[int] = set()
        if self.skipped:
            logger.warning("%s: skipped %d unreadable files (listed in dataset.skipped)", root, len(self.skipped))
        if self.converted:
            logger.info("%s: converting to RGB: %s", root, dict(self.converted))
        if self.upsampled:
            logger.info("%s: %d images are smaller than %d and will be upsampled", root, len(self.upsampled), size)
        if not self.samples:
            raise ValueError(f"no readable images under {root}"
                             + (f" ({len(self.skipped)} unreadable files skipped)" if self.skipped else ""))

    def _inspect(self, path: Path) -> bool:
        """Cheap validity check (PIL verify); records skips, conversions and upsampling."""
        try:
            with Image.open(path) as image:
                mode, size = image.mode, image.size
                image.verify()
        except _DECODE_ERRORS as err:
            self._skip(path, f"unreadable: {err}")
            return False
        if mode != "RGB":
            self.converted[mode] += 1
        if min(size) < self.size:
            self.upsampled.append(path)
            logger.debug("%s: %dx%d is smaller than %d, upsampled", path, *size, self.size)
        return True

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        logger.warning("skipping %s: %s", path, reason)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds flips for plain integer indices."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        count = len(self.samples)
        index = range(count)[index]  # IndexError out of range; negative indices count from the end
        for offset in range(count):
            position = (index + offset) % count
            if position in self._failed:
                continue
            path, label = self.samples[position]
            try:
                image = load_image(path, self.size)
            except _DECODE_ERRORS as err:
                self._failed.add(position)
                self._skip(path, f"failed to load, replaced by the next index: {err}")
                continue
            if self.hflip:
                image = random_hflip(image, self.flip_generator(index, epoch))
            return image, label
        raise RuntimeError(f"none of the {count} files under {self.root} could be loaded")

    def flip_generator(self, index: int, epoch: int) -> torch.Generator:
        """A generator seeded from (seed, epoch, index), well mixed by numpy's SeedSequence."""
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))


class ImageFolderDataset(_ImageFiles):
    """`root/CLASS/IMAGE` files as (uint8 (3, size, size), class index); policy in the module docstring."""

    def __init__(self, root: str | Path, size: int, *, hflip: bool = True, class_names: list[str] | None = None,
                 seed: int = 0, validate: bool = True, allow_empty_classes: bool = False) -> None:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"image folder {root} is not a directory")
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        unusable = [(p, f"{SYMLINK_LOOP} (not a class folder)") for p in entries if _not_a_file(p) == SYMLINK_LOOP]
        self.classes = _match_classes(root, [p.name for p in entries if p.is_dir()], class_names)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        candidates = []
        for label, name in enumerate(self.classes):
            files, odd = image_files(root / name)
            candidates += [(path, label) for path in files]
            unusable += odd
        super().__init__(root, candidates, size, hflip=hflip, seed=seed, validate=validate, unusable=unusable)
        counts = Counter(label for _, label in self.samples)
        empty = [str(root / name) for label, name in enumerate(self.classes) if counts[label] == 0]
        if empty and not allow_empty_classes:
            raise ValueError(f"{len(empty)} class folders hold no readable image: {', '.join(empty)} "
                             "(remove them, or keep their class indices with allow_empty_classes: "
                             "--set data.allow_empty_classes=true for training, --allow-empty-classes "
                             "for `pixelrepa data pack`)")
        if empty:
            logger.warning("%d empty class folders kept as classes with no images: %s", len(empty), ", ".join(empty))


def _match_classes(root: Path, folders: list[str], class_names: list[str] | None) -> list[str]:
    """Sorted folder names, or `class_names` after checking they name exactly the folders."""
    if class_names is None:
        return folders
    names = list(class_names)
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if duplicates:
        raise ValueError(f"class_names repeats {duplicates}")
    missing = sorted(set(names) - set(folders))
    extra = sorted(set(folders) - set(names))
    if missing or extra:
        raise ValueError(f"class_names do not match the folders of {root}: "
                         f"missing folders {missing}, folders not in class_names {extra}")
    return names


def check_num_classes(dataset: ImageFolderDataset, num_classes: int) -> None:
    """Fail before training when the folder's class count is not the model's `num_classes`."""
    if len(dataset.classes) != num_classes:
        raise ValueError(f"{dataset.root} has {len(dataset.classes)} classes but the model has "
                         f"num_classes={num_classes}: train on it with --set model.num_classes="
                         f"{len(dataset.classes)}")
