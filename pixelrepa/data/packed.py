"""Packed image sets: a folder of raw uint8 pixels read through a memory map, no decoding at training time.

Layout of a pack folder:

- `images.u8`: uint8 (N, size, size, 3), HWC, contiguous;
- `labels.i64`: int64 (N,);
- `manifest.json`: format tag, count, size, class names, source, SHA-256 of both files, creation
  info. It is written last, atomically: a folder without it is not a finished pack.

Writing is resumable. The data files are preallocated for every source item and filled in source
order, one chunk at a time; after each chunk both memory maps are flushed and `progress.json`
(items read, items written, skipped items, a hash identifying the source) is replaced atomically.
A re-run with the same source continues after the last committed chunk; a different source is
refused unless `overwrite`. Items a source cannot read (`SkippedItem`) are left out and listed in
the manifest; the files are cut to the written count when the pack is finished.

Replacing (`overwrite`) leaves DST as it is until the new pack is finished: the new pack is written,
resumably like any other, in the sibling folder `DST.partial`. When it is finished, DST is renamed
into it as `.replaced`, `DST.partial` is renamed to DST, and `DST/.replaced` is deleted. Each
rename is atomic on POSIX; between the two (one directory operation) no DST exists. The next pack
command on DST undoes a swap stopped in that window (the old pack goes back to DST; an overwrite
then swaps again without repacking) and finishes deleting a left-over `DST/.replaced`. The swap
replaces the whole folder, so an overwrite is refused while DST holds anything but a pack and its
encoder target caches (`targets/`); those caches describe the old images and are deleted with them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pixelrepa.version import __version__
from pixelrepa.data.folder import ImageFolderDataset, load_image
from pixelrepa.files import file_digest, fsync_path, write_text_atomic

FORMAT = "pixelrepa-pack/1"
IMAGES, LABELS, MANIFEST, PROGRESS = "images.u8", "labels.i64", "manifest.json", "progress.json"
TARGET_CACHES = "targets"  # the folder of the pack's encoder target caches (pixelrepa.training.targets)
PARTIAL = ".partial"  # the suffix of the sibling folder an overwrite writes the new pack in
REPLACED = ".replaced"  # the old pack's name inside the new one's folder while they are swapped
PACK_ENTRIES = {IMAGES, LABELS, MANIFEST, PROGRESS, TARGET_CACHES, REPLACED}
CHANNELS = 3
CHUNK_BYTES = 64 << 20  # default chunk: about 64 MiB of pixels between commits
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # as the folder dataset


class SkippedItem(Exception):
    """Raised by a source for an item it cannot read; the item is left out of the pack and reported."""


class PackedDataset(torch.utils.data.Dataset):
    """A finished pack as a map-style dataset: (uint8 (3, size, size), int label) per item.

    The manifest is checked on opening (format, file sizes, labels); `verify_checksum` also
    recomputes both SHA-256 sums (reads every byte). `expected_size` and `num_classes` refuse a
    pack made for another resolution or class count. Flips follow the folder dataset: with
    `hflip`, item `index` is mirrored with probability 1/2 by a generator seeded from (seed,
    epoch, index); index with `(index, epoch)` or call `set_epoch`."""

    def __init__(self, path: str | Path, *, hflip: bool = False, seed: int = 0, verify_checksum: bool = False,
                 expected_size: int | None = None, num_classes: int | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.size = self.manifest["size"]
        self.class_names = tuple(self.manifest["class_names"])
        self.hflip, self.seed, self.epoch = hflip, seed, 0
        if expected_size is not None and self.size != expected_size:
            raise ValueError(f"{self.path} holds {self.size}-px images, {expected_size} px expected")
        if num_classes is not None and len(self.class_names) != num_classes:
            raise ValueError(f"{self.path} has {len(self.class_names)} classes but the model has "
                             f"num_classes={num_classes}: train on it with --set model.num_classes="
                             f"{len(self.class_names)}")
        if verify_checksum:
            for name, expected in self.manifest["sha256"].items():
                if file_digest(self.path / name) != expected:
                    raise ValueError(f"{self.path / name}: SHA-256 does not match the manifest; the file is corrupt")
        self.labels = np.fromfile(self.path / LABELS, dtype=np.int64)
        if not 0 <= self.labels.min() <= self.labels.max() < len(self.class_names):
            raise ValueError(f"{self.path / LABELS}: labels outside 0..{len(self.class_names) - 1}")
        self._images: np.memmap | None = None

    @property
    def images(self) -> np.memmap:
        """The read-only (N, size, size, 3) memory map, opened on first use in each process."""
        if self._images is None:
            self._images = np.memmap(self.path / IMAGES, dtype=np.uint8, mode="r",
                                     shape=(len(self.labels), self.size, self.size, CHANNELS))
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # workers map the file themselves, nothing is copied

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds flips for plain integer indices."""
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        image = self.images[index]  # IndexError out of range
        if self.hflip and self.flipped(index % len(self), epoch):
            image = image[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[index])

    def flipped(self, index: int, epoch: int) -> bool:
        """Whether item `index` is mirrored in `epoch`: the folder dataset's draw for the same (seed, epoch, index)."""
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
        return torch.rand((), generator=torch.Generator().manual_seed(int(state))).item() < 0.5


def read_manifest(path: str | Path) -> dict:
    """The manifest of a finished pack, after checking its format tag and the data files' sizes."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no pack folder at {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / PROGRESS).is_file():
            progress = _read_json(path / PROGRESS)
            raise ValueError(f"{path} is an unfinished pack ({progress.get('next')} of {progress.get('capacity')} "
                             "source items read); run the same pack command again to finish it")
        raise ValueError(f"{path} has no {MANIFEST}: not a pixelrepa pack")
    manifest = _read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    missing = [key for key in ("count", "size", "channels", "class_names", "sha256") if key not in manifest]
    if missing:
        raise ValueError(f"{manifest_path} lacks {', '.join(missing)}")
    if manifest.get("channels") != CHANNELS:
        raise ValueError(f"{manifest_path}: {manifest.get('channels')} channels, only {CHANNELS} are supported")
    count, size = manifest["count"], manifest["size"]
    for name, expected in ((IMAGES, count * size * size * CHANNELS), (LABELS, count * 8)):
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing")
        actual = file.stat().st_size
        if actual != expected:
            problem = "truncated" if actual < expected else "longer than the manifest says"
            raise ValueError(f"{file} is {problem}: {actual} bytes, {expected} expected "
                             f"for {count} images of {size}x{size}x{CHANNELS}")
    return manifest


def pack_images(source: Sequence | Iterable, dst: str | Path, size: int, class_names: Sequence[str], *,
                workers: int = 1, count: int | None = None, source_name: str = "",
                source_hash: str | None = None, skipped: Sequence[str] = (), overwrite: bool = False,
                chunk_size: int | None = None) -> dict:
    """Write a pack from (image, label) items; returns the manifest.

    An image is a uint8 array (size, size, 3), a uint8 tensor (3, size, size) or an RGB PIL image
    of that size. `source` is either random-access (`len` and indexing, e.g. a map-style
    dataset; read by `workers` processes in source order) or an iterable of `count` items (read
    in this process). An unreadable item raises (random access) or is (iterable) a
    `SkippedItem`. `source_hash` identifies the source when a partial pack is resumed; the
    default covers only count, size and class names, so pass one whenever two sources could
    share them. `skipped` lists items the caller already left out, for the manifest. Progress is
    committed every `chunk_size` source items (default: about 64 MiB of pixels). An existing
    finished pack is refused unless `overwrite`, which replaces `dst` only once the new pack is
    finished (module docstring)."""
    dst = Path(dst)
    random_access = hasattr(source, "__len__") and hasattr(source, "__getitem__")
    if count is None:
        if not random_access:
            raise ValueError("an iterable source needs its item count (count=...)")
        count = len(source)
    if count <= 0:
        raise ValueError("the source has no items: nothing to pack")
    if workers > 1 and not random_access:
        raise ValueError("parallel packing needs a random-access source (len and indexing)")
    if source_hash is None:
        source_hash = _sha256_json([count, size, list(class_names)])
    plan = {"format": FORMAT, "capacity": count, "size": size, "class_names": list(class_names),
            "source": source_name, "source_hash": source_hash}
    _recover_interrupted_swap(dst)
    partial = _partial_folder(dst)
    if overwrite:
        _check_replaceable(dst)
    elif os.path.lexists(partial):
        raise ValueError(f"{partial} holds an unfinished --overwrite of {dst}: run with --overwrite to continue it, "
                         f"or delete {partial}")
    folder = partial if overwrite else dst
    progress = _start_or_resume(folder, plan, list(skipped), replacing=overwrite)
    if progress is None:
        manifest = read_manifest(folder)  # finished by an overwrite stopped before its swap
    else:
        _fill(folder, source, progress, random_access, chunk_size, workers)
        manifest = _finish(folder, progress)
    if overwrite:
        _swap_in(partial, dst)
    return manifest


def _fill(folder: Path, source: Sequence | Iterable, progress: dict, random_access: bool, chunk_size: int | None,
          workers: int) -> None:
    """Write the source items after `progress["next"]` into `folder`, committing `progress` after each chunk."""
    count, size, num_classes = progress["capacity"], progress["size"], len(progress["class_names"])
    item_bytes = size * size * CHANNELS
    chunk_size = chunk_size or max(1, CHUNK_BYTES // item_bytes)
    images = _open_preallocated(folder / IMAGES, np.uint8, (count, size, size, CHANNELS),
                                progress["written"] * item_bytes)
    labels = _open_preallocated(folder / LABELS, np.int64, (count,), progress["written"] * 8)
    if random_access:
        chunks = _read_chunks(source, progress["next"], count, chunk_size, size, workers)
    else:
        items = itertools.islice(source, progress["next"], count)
        chunks = _iterate_chunks(items, progress["next"], count, chunk_size, size)
    for end, chunk_images, chunk_labels, chunk_skipped in chunks:
        if len(chunk_labels) and not 0 <= chunk_labels.min() <= chunk_labels.max() < num_classes:
            raise ValueError(f"labels before source item {end} fall outside 0..{num_classes - 1}")
        start, stop = progress["written"], progress["written"] + len(chunk_labels)
        images[start:stop] = chunk_images
        labels[start:stop] = chunk_labels
        images.flush()
        labels.flush()
        progress.update(next=end, written=stop, skipped=progress["skipped"] + chunk_skipped)
        _write_json_atomic(folder / PROGRESS, progress)
    del images, labels
    if progress["next"] != count:
        raise ValueError(f"the source ended after {progress['next']} of {count} items")


def pack_arrays(images: np.ndarray | Tensor, labels: np.ndarray | Tensor, dst: str | Path,
                class_names: Sequence[str], source: str = "", *, overwrite: bool = False) -> dict:
    """Pack an in-memory set: uint8 images (N, 3, H, W) with H == W, int labels (N,)."""
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != CHANNELS \
            or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be uint8 (N, 3, S, S), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{len(images)} images but labels of shape {labels.shape}")
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    digest.update(labels.data)
    return pack_images(_ArraySource(images.transpose(0, 2, 3, 1), labels), dst, images.shape[2], class_names,
                       source_name=source, source_hash=digest.hexdigest(), overwrite=overwrite)


def pack_folder(src_root: str | Path, dst: str | Path, size: int, *, workers: int = 1,
                overwrite: bool = False, allow_empty_classes: bool = False) -> dict:
    """Pack an ImageNet-layout folder (one sub-folder per class, sorted) with the ADM center crop, no flip.

    Files the folder scan rejects and files that fail to decode are left out and listed in
    the manifest's `skipped`."""
    src_root = Path(src_root)
    folder = ImageFolderDataset(src_root, size, hflip=False, allow_empty_classes=allow_empty_classes)
    samples = [(str(path), int(label)) for path, label in folder.samples]
    listing = [[os.path.relpath(path, src_root), label] for path, label in samples]
    return pack_images(_FolderSource(samples, size), dst, size, folder.classes, workers=workers,
                       source_name=str(src_root.resolve()), source_hash=_sha256_json(listing),
                       skipped=[f"{path}: {reason}" for path, reason in folder.skipped], overwrite=overwrite)


class _ArraySource:
    """Random-access (HWC image, label) items over in-memory arrays."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images_hwc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class _FolderSource:
    """Random-access files decoded as the folder dataset does (no flip); picklable, for worker processes."""

    def __init__(self, samples: list[tuple[str, int]], size: int):
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        try:
            return load_image(path, self.size), label
        except DECODE_ERRORS as err:
            raise SkippedItem(f"{path}: failed to load: {err}") from None


def _partial_folder(dst: str | Path) -> Path:
    """The sibling folder where an overwrite of `dst` writes the new pack (module docstring)."""
    dst = Path(os.path.abspath(dst))
    return dst.with_name(dst.name + PARTIAL)


def _start_or_resume(folder: Path, plan: dict, skipped: list[str], replacing: bool) -> dict | None:
    """The progress record to continue from, after refusing whatever must not be touched; None where
    `folder` holds this plan's finished pack (`replacing` only). `replacing`: `folder` is an
    overwrite's `.partial` folder, whose pack of another plan is discarded."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    ours = [folder / name for name in (MANIFEST, PROGRESS, IMAGES, LABELS)]
    if (folder / MANIFEST).exists():
        if not replacing:
            raise ValueError(f"{folder} already holds a finished pack; pass --overwrite to replace it")
        manifest = _read_json(folder / MANIFEST)
        # A finished pack records its item count, not the source's: the source hash identifies the source.
        if all(manifest.get(key) == value for key, value in plan.items() if key != "capacity"):
            return None
    elif (folder / PROGRESS).exists():
        progress = _read_json(folder / PROGRESS)
        changed = [key for key, value in plan.items() if progress.get(key) != value]
        if not changed:
            return progress
        if not replacing:
            raise ValueError(f"{folder} holds an unfinished pack of a different source ({', '.join(changed)} "
                             "differ); pass --overwrite to start again")
    elif any(file.exists() for file in ours) and not replacing:
        raise ValueError(f"{folder} holds pack data files without {PROGRESS} or {MANIFEST}; "
                         "pass --overwrite to replace them")
    for file in ours:  # (replacing) another plan's pack; the manifest goes first, so it never looks finished
        file.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    progress = {**plan, "next": 0, "written": 0, "skipped": skipped}
    _write_json_atomic(folder / PROGRESS, progress)
    return progress


def _check_replaceable(dst: Path) -> None:
    """Refuse an overwrite whose swap would delete more than a pack: it replaces `dst`'s whole folder."""
    if dst.is_symlink():
        raise ValueError(f"{dst} is a symbolic link: pass the folder it points to ({dst.resolve()}) to replace "
                         "the pack there")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a folder")
    others = sorted(entry.name for entry in dst.iterdir() if entry.name not in PACK_ENTRIES) if dst.is_dir() else []
    if others:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"{dst} holds {listed} besides a pack, and --overwrite replaces the whole folder: "
                         "move them out first, or pack into another folder")


def _swap_in(new: Path, dst: Path) -> None:
    """Put the finished pack `new` in `dst`'s place with two renames, then delete the old pack."""
    _check_replaceable(dst)  # again: files may have been added while the new pack was written
    try:
        if os.path.lexists(dst):
            os.rename(dst, new / REPLACED)  # from here to the next rename no `dst` exists
        os.rename(new, dst)
    except BaseException:
        _recover_interrupted_swap(dst)
        raise
    fsync_path(dst.parent)
    if (dst / REPLACED).exists():
        shutil.rmtree(dst / REPLACED)


def _recover_interrupted_swap(dst: Path) -> None:
    """Undo an overwrite stopped between its two renames (the old pack goes back to `dst`), and finish
    deleting an old pack left as `dst/.replaced` by one stopped after them."""
    stranded = _partial_folder(dst) / REPLACED
    if not os.path.lexists(dst) and stranded.is_dir():
        os.rename(stranded, dst)
    if (dst / REPLACED).is_dir():
        shutil.rmtree(dst / REPLACED)


def _open_preallocated(path: Path, dtype: type, shape: tuple[int, ...], committed_bytes: int) -> np.memmap:
    """A writable memory map of the full shape whose first `committed_bytes` are kept as they are."""
    if not path.exists():
        if committed_bytes:
            raise ValueError(f"{path} is missing but {PROGRESS} records written items; pass --overwrite to start again")
        path.touch()
    if path.stat().st_size < committed_bytes:
        raise ValueError(f"{path} is shorter than the items {PROGRESS} records as written; "
                         "pass --overwrite to start again")
    os.truncate(path, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)


def _finish(dst: Path, progress: dict) -> dict:
    written, size = progress["written"], progress["size"]
    if written == 0:
        raise ValueError(f"none of the {progress['capacity']} source items could be read; see {dst / PROGRESS}")
    os.truncate(dst / IMAGES, written * size * size * CHANNELS)
    os.truncate(dst / LABELS, written * 8)
    manifest = {
        "format": FORMAT, "count": written, "size": size, "channels": CHANNELS, "layout": "NHWC uint8",
        "class_names": progress["class_names"], "source": progress["source"],
        "source_hash": progress["source_hash"], "skipped": progress["skipped"],
        "sha256": {IMAGES: file_digest(dst / IMAGES), LABELS: file_digest(dst / LABELS)},
        "created": {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pixelrepa": __version__,
                    "numpy": np.__version__, "python": platform.python_version()},
    }
    _write_json_atomic(dst / MANIFEST, manifest)
    (dst / PROGRESS).unlink()
    return manifest


def _read_chunks(source: Sequence, start: int, count: int, chunk_size: int, size: int, workers: int):
    """(end, images, labels, skipped) per chunk of a random-access source, in order; with workers > 1
    the next chunk is decoded while the current one is written."""
    bounds = [(a, min(a + chunk_size, count)) for a in range(start, count, chunk_size)]
    if workers <= 1:
        for a, b in bounds:
            yield (b, *_load_range(source, size, a, b))
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(source, size)) as pool:
        def submit(a: int, b: int) -> tuple[int, list]:
            step = -(-(b - a) // (4 * workers))  # a few tasks per worker and chunk
            return b, [pool.submit(_load_range_in_worker, i, min(i + step, b)) for i in range(a, b, step)]
        pending = None
        for a, b in bounds:
            submitted = submit(a, b)
            if pending is not None:
                yield _gather(*pending)
            pending = submitted
        if pending is not None:
            yield _gather(*pending)


def _gather(end: int, futures: list) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
    parts = [future.result() for future in futures]
    return (end, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [message for p in parts for message in p[2]])


def _iterate_chunks(items: Iterable, start: int, count: int, chunk_size: int, size: int):
    """(end, images, labels, skipped) per chunk of an iterable already advanced to `start`."""
    for a in range(start, count, chunk_size):
        b = min(a + chunk_size, count)
        yield (b, *_convert_items(itertools.islice(items, b - a), size, a))


def _load_range(source: Sequence, size: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    items = []
    for index in range(a, b):
        try:
            items.append(source[index])
        except SkippedItem as skipped:
            items.append(skipped)
    return _convert_items(items, size, a)


def _convert_items(items: Iterable, size: int, first: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stacked HWC uint8 images, int64 labels and skip messages of (image, label) items (or SkippedItem)."""
    images, labels, skipped = [], [], []
    for index, item in enumerate(items, start=first):
        if isinstance(item, SkippedItem):
            skipped.append(str(item))
            continue
        image, label = item
        images.append(_as_hwc(image, size, index))
        labels.append(int(label))
    stacked = np.stack(images) if images else np.empty((0, size, size, CHANNELS), np.uint8)
    return stacked, np.asarray(labels, dtype=np.int64), skipped


def _as_hwc(image, size: int, index: int) -> np.ndarray:
    """A source image as a uint8 (size, size, 3) array, or ValueError naming the item."""
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    elif isinstance(image, Tensor):
        image = image.numpy().transpose(1, 2, 0) if image.ndim == 3 else image.numpy()
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (size, size, CHANNELS):
        shape = getattr(image, "shape", None)
        raise ValueError(f"source item {index}: expected a uint8 image of {size}x{size}x{CHANNELS} (HWC array, "
                         f"CHW tensor or RGB PIL image), got {type(image).__name__} {getattr(image, 'dtype', '')} "
                         f"{tuple(shape) if shape is not None else ''}")
    return image


_WORKER_SOURCE: tuple[Sequence, int] | None = None


def _init_worker(source: Sequence, size: int) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = (source, size)


def _load_range_in_worker(a: int, b: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    source, size = _WORKER_SOURCE
    return _load_range(source, size, a, b)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2), durable=True)


def _sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()
