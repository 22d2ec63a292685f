"""Sample folders: many generated images (`pixelrepa.sampling.generate`) as PNG / npz.

A folder holds `manifest.json` (what made the images), `images/{k:06d}.png` and,
once every image exists, `samples.npz` with `arr_0` uint8 (N, H, W, 3) and `labels`
(the layout of the ADM evaluation suite). PNGs are written atomically and act as the
resumable store: a restart only generates the missing ones.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from torch import Tensor

from pixelrepa.config import RunConfig
from pixelrepa.files import atomic_write, write_text_atomic
from pixelrepa.images import is_complete_png, read_png, write_png
from pixelrepa.sampling import ClassLayout

MANIFEST_FORMAT = "pixelrepa-samples/1"
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
MANIFEST_NAME = "manifest.json"


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
