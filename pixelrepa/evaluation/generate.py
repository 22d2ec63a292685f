"""Generating many samples reproducibly: per-index noise and labels, PNG / npz output folders.

Image k depends only on (model, sampler settings, seed, k): its noise comes from a CPU
generator seeded with `seed * 1_000_003 + k` and its label from a `ClassLayout`, so the
same k gives the same image (up to float rounding of the batched network) whatever the
batch size or the number of processes.

An output folder holds `manifest.json` (what made the images), `images/{k:06d}.png` and,
once every image exists, `samples.npz` with `arr_0` uint8 (N, H, W, 3) and `labels`
(the layout of the ADM evaluation suite). PNGs are written atomically and act as the
resumable store: a restart only generates the missing ones.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pixelrepa.config import RunConfig
from pixelrepa.data.transforms import to_uint8
from pixelrepa.sampling import sample
from pixelrepa.files import atomic_write, write_text_atomic
from pixelrepa.training.checkpoint import export_sampling_checkpoint, find_checkpoint
from pixelrepa.training.device import autocast_for

MODEL_FILE_NAME = "model.safetensors"

SEED_STRIDE = 1_000_003
MANIFEST_FORMAT = "pixelrepa-samples/1"
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
MANIFEST_NAME = "manifest.json"


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
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    noise = torch.randn(m.in_channels, m.input_size, m.input_size, generator=generator)
    return noise * config.objective.noise_scale


def generate(net: nn.Module, config: RunConfig, indices: Iterable[int], labels_for: Callable[[int], int],
             batch_size: int, device: torch.device, seed: int = 0) -> Iterator[tuple[list[int], Tensor]]:
    """Sample images `indices` in batches: yields (batch indices, uint8 (n, C, H, W) on CPU)."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        noise = torch.stack([image_noise(config, seed, k) for k in batch]).to(device)
        labels = torch.tensor([labels_for(k) for k in batch], device=device)
        with autocast_for(device):
            x = sample(net, noise, labels, config.model.num_classes, config.sampler, config.objective.t_eps)
        yield batch, to_uint8(x).cpu()


def sample_classes(net: nn.Module, config: RunConfig, classes: list[int], per_class: int, seed: int,
                   device: torch.device, batch_size: int = 64) -> Tensor:
    """uint8 (len(classes) * per_class, C, H, W), class-major: images 0.. of a `sample` run
    with the same classes, per-class count and seed."""
    layout = class_layout(config.model.num_classes, classes, per_class)
    return torch.cat([x for _, x in generate(net, config, range(len(layout)), layout, batch_size, device, seed)])


# ---------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------

def run_settings(model_sha256: str, config: RunConfig, layout: ClassLayout, num_images: int, seed: int) -> dict:
    """Everything that determines the images of a folder; a restart must match it exactly."""
    return {"model_sha256": model_sha256, "sampler": dataclasses.asdict(config.sampler), "seed": seed,
            "num_images": num_images, "classes": list(layout.classes), "per_class": layout.per_class}


def prepare_output(out: Path, model_path: Path, settings: dict, overwrite: bool) -> None:
    """Create or reuse `out`. Refuses a folder made with other settings unless `overwrite`,
    which first removes the previous samples. Call from one process only."""
    manifest_path = out / MANIFEST_NAME
    previous = _read_manifest(manifest_path)
    if previous != settings and (previous is not None or (out.is_dir() and any(out.iterdir()))):
        if not overwrite:
            if previous is None:
                raise ValueError(f"{out} is not empty and has no readable {MANIFEST_NAME}; "
                                 "use another folder or --overwrite")
            changed = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
            raise ValueError(f"{out} holds samples made with other settings (differs in: {', '.join(changed)}); "
                             "use another folder or --overwrite")
        shutil.rmtree(out / IMAGES_DIR, ignore_errors=True)
        (out / NPZ_NAME).unlink(missing_ok=True)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out / IMAGES_DIR).glob(".*.tmp-*"):  # left by an interrupted write
        stale.unlink()
    manifest = {"format": MANIFEST_FORMAT, "model": str(model_path.resolve()), "settings": settings}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")


def _read_manifest(path: Path) -> dict | None:
    """The settings recorded in a manifest, or None when there is no readable one."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("settings") if isinstance(manifest, dict) else None


def png_path(out: Path, index: int) -> Path:
    return out / IMAGES_DIR / f"{index:06d}.png"


def is_complete_png(path: Path) -> bool:
    """True when `path` exists and is a readable PNG."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SyntaxError):
        return False


def write_png(path: Path, image: Tensor) -> None:
    """uint8 (C, H, W) to PNG, atomically."""
    array = image.permute(1, 2, 0).numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def read_png(path: Path) -> np.ndarray:
    """uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def missing_pngs(out: Path, indices: Iterable[int]) -> list[int]:
    """The indices among `indices` without a complete PNG in `out`."""
    return [k for k in indices if not is_complete_png(png_path(out, k))]


def write_pngs(out: Path, indices: list[int], images: Tensor) -> None:
    """PNGs for a batch as `generate` yields it."""
    for k, image in zip(indices, images):
        write_png(png_path(out, k), image)


def write_npz(out: Path, num_images: int, labels_for: Callable[[int], int]) -> Path:
    """`samples.npz` from PNGs 0..num_images-1: `arr_0` uint8 (N, H, W, 3) and `labels` int64.

    Streamed image by image into an uncompressed zip (what `np.savez` writes), so memory
    stays at one image whatever N."""
    missing = [k for k in range(num_images) if not png_path(out, k).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_images} images are missing from {out / IMAGES_DIR} "
                                f"(first: {missing[0]}); rerun to complete them")
    first = read_png(png_path(out, 0))
    shape = (num_images, *first.shape)
    labels = np.array([labels_for(k) for k in range(num_images)], dtype=np.int64)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for k in range(num_images):
                    image = first if k == 0 else read_png(png_path(out, k))
                    if image.shape != first.shape:
                        raise ValueError(f"{png_path(out, k)} is {image.shape}, expected {first.shape}")
                    f.write(np.ascontiguousarray(image).tobytes())
            with archive.open("labels.npy", "w") as f:
                np.lib.format.write_array(f, labels)

    path = out / NPZ_NAME
    atomic_write(path, write)
    return path


# ---------------------------------------------------------------------------
# The model to sample
# ---------------------------------------------------------------------------

def resolve_model_path(path: Path, ema: int = 1) -> Path:
    """A model file; the model file inside a folder; or, for a training run or checkpoint
    folder, its latest checkpoint's EMA backbone, exported once next to that checkpoint."""
    if not path.is_dir():
        return path
    if (path / MODEL_FILE_NAME).is_file():
        return path / MODEL_FILE_NAME
    try:
        checkpoint = find_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds neither {MODEL_FILE_NAME} nor a training checkpoint (model files "
                                "come from `pixelrepa export` or `pixelrepa import`)") from None
    exported = checkpoint / f"sampling-ema{ema}.safetensors"
    if not exported.is_file():
        export_sampling_checkpoint(checkpoint, exported, ema=ema)
    return exported
