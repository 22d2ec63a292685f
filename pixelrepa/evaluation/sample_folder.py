"""Sample folders: many generated images (`pixelrepa.sampling.generate`) as PNG / npz.

A folder holds `manifest.json` (what made the images), `images/{k:06d}.png` and,
once every image exists, `samples.npz` with `arr_0` uint8 (N, H, W, 3) and `labels`
(the layout of the ADM evaluation suite). PNGs are written atomically and act as the
resumable store: a restart only generates the missing ones.

`sample_to_folder(SampleSettings(model, out, ...), world)` fills a folder (the images split over
the processes of `world`); `sample_grid(settings, device)` writes one labelled grid instead, the
same images as 0.. of a folder with those classes. `pixelrepa sample` is their command line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from pixelrepa.config import RunConfig, apply_overrides
from pixelrepa.device import apply_kernels
from pixelrepa.distributed import World, broadcast_object, reduce_mean
from pixelrepa.files import atomic_write, file_digest, write_text_atomic
from pixelrepa.images import is_complete_png, read_png, save_labelled_grid, write_png
from pixelrepa.loading import load_model, resolve_model_path
from pixelrepa.models.jit import JiT
from pixelrepa.sampling import ClassLayout, check_guide, class_layout, generate, sample_classes

MANIFEST_FORMAT = "pixelrepa-samples/1"
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
MANIFEST_NAME = "manifest.json"


# ---------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------

def run_settings(model_sha256: str, config: RunConfig, layout: ClassLayout, num_images: int, seed: int,
                 guide_sha256: str | None = None) -> dict:
    """Everything that determines the images of a folder; a restart must match it exactly."""
    settings = {"model_sha256": model_sha256, "sampler": dataclasses.asdict(config.sampler), "seed": seed,
                "num_images": num_images, "classes": list(layout.classes), "per_class": layout.per_class}
    return settings if guide_sha256 is None else settings | {"guide_sha256": guide_sha256}


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


# ---------------------------------------------------------------------------
# Sampling a model into a folder, or a grid
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleSettings:
    """One sampling run: the model, the images to make and where they go."""

    model: Path
    """A model file, a folder holding model.safetensors, or a training run / checkpoint folder."""
    out: Path
    """The output folder (`sample_grid`: the .png file)."""
    ema: int = 1
    """A training run's EMA (1-based), exported once next to its checkpoint."""
    num_images: int | None = None
    """None: classes x per_class; more repeats the class layout. Not used by `sample_grid`."""
    classes: tuple[int, ...] | None = None
    """Class indices; None: every class (`sample_grid`: the first 10)."""
    per_class: int | None = None
    """Consecutive images per class; None: 50 (`sample_grid`: 8)."""
    batch_size: int = 64
    """Images per forward batch, per process."""
    seed: int = 0
    format: Literal["png", "npz", "both"] = "both"
    """What the folder keeps: the PNGs, the npz (the PNGs are removed once it is written) or both."""
    grid: Path | None = None
    """Also write a labelled grid of the folder's first images here."""
    overwrite: bool = False
    """Replace samples made with other settings."""
    sampler: dict[str, object] = field(default_factory=dict)
    """Changes to the model's SamplerConfig by field name, e.g. {"steps": 2, "cfg_scale": 2.0}."""
    guide: Path | None = None
    """Autoguidance: a weaker model of the same data (model file, run or checkpoint folder) guides
    instead of the unconditional pass, with weight cfg_scale on the guidance interval."""
    guide_ema: int = 1
    """The guide's EMA when it is a training run (1-based)."""


@dataclass(frozen=True)
class SampleResult:
    """What a run wrote."""

    path: Path
    """The folder, or the grid's .png."""
    config: RunConfig
    """The model's config with the sampler changes."""
    classes: tuple[int, ...]
    per_class: int
    num_images: int
    made: int
    """Images generated by this run (the others were there already)."""


def load_for_sampling(path: Path, sampler: dict[str, object], device: torch.device) -> tuple[RunConfig, JiT]:
    """The model file's config with the `sampler` changes, and its backbone in eval mode."""
    config, net, _ = load_model(path, device=device)
    config = apply_overrides(config, {f"sampler.{name}": value for name, value in sampler.items()})
    apply_kernels(net, net.blocks, config.kernels, device, sampling=True)
    return config, net


def load_guide(path: Path, config: RunConfig, device: torch.device, ema: int = 1) -> JiT:
    """The guide model's backbone (through `load_model`), refused unless it fits `config` (`check_guide`)."""
    guide_config, net, _ = load_model(resolve_model_path(path, ema), device=device)
    check_guide(config, guide_config)
    apply_kernels(net, net.blocks, guide_config.kernels, device, sampling=True)
    return net


def _check_batch_size(settings: SampleSettings) -> None:
    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")


def sample_grid(settings: SampleSettings, device: torch.device) -> SampleResult:
    """A labelled grid at `settings.out`, one row per class (default the first 10 classes x 8)."""
    _check_batch_size(settings)
    config, net = load_for_sampling(resolve_model_path(settings.model, settings.ema), settings.sampler, device)
    classes = settings.classes or tuple(range(min(10, config.model.num_classes)))
    per_class = 8 if settings.per_class is None else settings.per_class
    guide = None if settings.guide is None else load_guide(settings.guide, config, device, settings.guide_ema)
    images = sample_classes(net, config, list(classes), per_class, settings.seed, device, settings.batch_size, guide)
    save_labelled_grid(images, [str(c) for c in classes], settings.out)
    return SampleResult(settings.out, config, tuple(classes), per_class, len(images), len(images))


def sample_to_folder(settings: SampleSettings, world: World) -> SampleResult | None:
    """Make the images of `settings.out` that are missing, this process's share of them (every process
    of `world` calls it), then on rank 0 the npz and the grid; the result on rank 0, None elsewhere."""
    _check_batch_size(settings)
    model_path = resolve_model_path(settings.model, settings.ema)
    config, net = load_for_sampling(model_path, settings.sampler, world.device)
    guide_path = None if settings.guide is None else resolve_model_path(settings.guide, settings.guide_ema)
    guide = None if guide_path is None else load_guide(guide_path, config, world.device)
    layout = class_layout(config.model.num_classes, settings.classes,
                          50 if settings.per_class is None else settings.per_class)
    num_images = len(layout) if settings.num_images is None else settings.num_images
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    out = settings.out
    error = None
    if world.is_main:
        try:
            recorded = run_settings(file_digest(model_path), config, layout, num_images, settings.seed,
                                    None if guide_path is None else file_digest(guide_path))
            prepare_output(out, model_path, recorded, settings.overwrite)
        except (ValueError, OSError) as err:
            error = err
    error = broadcast_object(error, world)  # every rank stops, with rank 0's error
    if error is not None:
        raise error

    grid_rows = grid_indices(layout, num_images) if settings.grid else []
    npz_done = settings.format != "png" and (out / NPZ_NAME).is_file()
    # The PNGs are the working store; an npz-only run that is complete needs only the grid's.
    wanted = [k for row in grid_rows for k in row] if settings.format == "npz" and npz_done else range(num_images)
    todo = missing_pngs(out, wanted[world.rank::world.world_size])
    with tqdm(total=len(todo), desc="sampling", unit="img", dynamic_ncols=True, disable=not world.is_main) as bar:
        for batch, images in generate(net, config, todo, layout, settings.batch_size, world.device, settings.seed,
                                      guide):
            write_pngs(out, batch, images)
            bar.update(len(batch))
    # A collective: it also waits for every process to finish before rank 0 assembles.
    made = round(reduce_mean({"made": len(todo)}, world)["made"] * world.world_size)
    if not world.is_main:
        return None
    _finish(settings, layout, num_images, grid_rows, npz_done)
    return SampleResult(out, config, tuple(layout.classes), layout.per_class, num_images, made)


def _finish(settings: SampleSettings, layout: ClassLayout, num_images: int, grid_rows: list[list[int]],
            npz_done: bool) -> None:
    """Once every image exists: the grid, the npz, and the PNGs removed if only the npz is kept."""
    out = settings.out
    if grid_rows:
        images = torch.stack([torch.from_numpy(read_png(png_path(out, k))).permute(2, 0, 1)
                              for row in grid_rows for k in row])
        save_labelled_grid(images, [str(layout(row[0])) for row in grid_rows], settings.grid)
    if settings.format != "png" and not npz_done:
        write_npz(out, num_images, layout)
    if settings.format == "npz":
        shutil.rmtree(out / IMAGES_DIR)


def grid_indices(layout: ClassLayout, num_images: int, rows: int = 10, cols: int = 8) -> list[list[int]]:
    """Image indices of a grid: the first `cols` images of each of the first `rows` class blocks."""
    cols = min(cols, layout.per_class, num_images)
    blocks = [[b * layout.per_class + j for j in range(cols)] for b in range(min(rows, len(layout.classes)))]
    return [block for block in blocks if block[-1] < num_images]
