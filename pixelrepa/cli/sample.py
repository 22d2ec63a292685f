"""Generate samples from a model file: a folder of PNGs and / or an npz, or one grid.

`pixelrepa sample MODEL OUT` writes OUT/images/{k:06d}.png and OUT/samples.npz (`arr_0`
uint8 (N, H, W, 3) and `labels`, the ADM evaluation layout): by default 50 images of every
class, class-major. Image k depends only on the model, the sampler settings, the seed and
k, so a run can be split over processes (`torchrun --nproc_per_node G pixelrepa sample
...`) and resumed: a rerun makes only the missing images. OUT/manifest.json records the
settings; a rerun with other settings is refused unless --overwrite.

With OUT ending in .png it writes just a labelled grid (one row per class, default the
first 10 classes x 8), the same images as 0.. of a folder run with those classes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from pixelrepa.cli.common import add_sampler_arguments, describe_sampler, os_error_message, sampler_overrides
from pixelrepa.config import RunConfig, apply_overrides
from pixelrepa.device import apply_kernels, pick_device
from pixelrepa.evaluation.sample_folder import (
    IMAGES_DIR,
    NPZ_NAME,
    missing_pngs,
    png_path,
    prepare_output,
    run_settings,
    write_npz,
    write_pngs,
)
from pixelrepa.files import file_digest
from pixelrepa.images import read_png, save_labelled_grid
from pixelrepa.loading import MODEL_FILE_NAME, load_model, resolve_model_path
from pixelrepa.models.jit import JiT
from pixelrepa.sampling import ClassLayout, class_layout, generate, sample_classes
from pixelrepa.distributed import World, broadcast_object, in_process_group, reduce_mean

def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help=f"a pixelrepa model file, a folder holding {MODEL_FILE_NAME}, "
                        "or a training run / checkpoint folder (its EMA backbone)")
    parser.add_argument("--ema", type=int, default=1, help="with a training run: EMA 1 (default) or 2")
    parser.add_argument("output", type=Path, help="output folder (or a .png path: just a labelled grid)")
    parser.add_argument("--num-images", type=int,
                        help="images to make (default: classes x per-class; more repeats the class layout)")
    parser.add_argument("--classes", type=int, nargs="+", help="class indices (default: all; grid: the first 10)")
    parser.add_argument("--per-class", type=int, help="consecutive images per class (default 50; grid: 8)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward batch, per process")
    add_sampler_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["png", "npz", "both"], default="both",
                        help="keep the PNGs, the npz or both (npz: the PNGs are removed once it is written)")
    parser.add_argument("--grid", type=Path, metavar="PATH.png", help="also write a labelled grid of the first images")
    parser.add_argument("--overwrite", action="store_true", help="replace samples made with other settings")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output.suffix.lower() == ".png":
        return run_grid(args)
    return in_process_group(lambda world: run_folder(args, world))


def load_for_sampling(path: Path, args: argparse.Namespace, device: torch.device) -> tuple[RunConfig, JiT]:
    """The model file's config with the command's sampler overrides, and its backbone in eval mode."""
    config, net, _ = load_model(path, device=device)
    config = apply_overrides(config, sampler_overrides(args))
    apply_kernels(net, net.blocks, config.kernels, device, sampling=True)
    return config, net


def run_grid(args: argparse.Namespace) -> int:
    device = pick_device()
    config, net = load_for_sampling(resolve_model_path(args.model, args.ema), args, device)
    classes = args.classes or list(range(min(10, config.model.num_classes)))
    per_class = 8 if args.per_class is None else args.per_class
    images = sample_classes(net, config, classes, per_class, args.seed, device, args.batch_size)
    save_labelled_grid(images, [str(c) for c in classes], args.output)
    print(f"wrote {args.output}: {len(classes)} classes x {per_class}, {describe_sampler(config)}")
    return 0


def run_folder(args: argparse.Namespace, world: World) -> int:
    model_path = resolve_model_path(args.model, args.ema)
    config, net = load_for_sampling(model_path, args, world.device)
    layout = class_layout(config.model.num_classes, args.classes,
                          50 if args.per_class is None else args.per_class)
    num_images = len(layout) if args.num_images is None else args.num_images
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    out = args.output
    error = None
    if world.is_main:
        try:
            settings = run_settings(file_digest(model_path), config, layout, num_images, args.seed)
            prepare_output(out, model_path, settings, args.overwrite)
        except (ValueError, OSError) as err:
            error = os_error_message(err) if isinstance(err, OSError) else str(err)
    error = broadcast_object(error, world)
    if error is not None:
        raise ValueError(error)

    grid_rows = grid_indices(layout, num_images) if args.grid else []
    npz_done = args.format != "png" and (out / NPZ_NAME).is_file()
    # The PNGs are the working store; an npz-only run that is complete needs only the grid's.
    wanted = [k for row in grid_rows for k in row] if args.format == "npz" and npz_done else range(num_images)
    todo = missing_pngs(out, wanted[world.rank::world.world_size])
    with tqdm(total=len(todo), desc="sampling", unit="img", dynamic_ncols=True, disable=not world.is_main) as bar:
        for batch, images in generate(net, config, todo, layout, args.batch_size, world.device, args.seed):
            write_pngs(out, batch, images)
            bar.update(len(batch))
    # A collective: it also waits for every process to finish before rank 0 assembles.
    made = round(reduce_mean({"made": len(todo)}, world)["made"] * world.world_size)
    if world.is_main:
        finish(args, out, layout, num_images, grid_rows, npz_done)
        print(f"{out}: {num_images} images ({made} made now, {num_images - made} already there), "
              f"{describe_sampler(config)}, seed {args.seed}")
    return 0


def finish(args: argparse.Namespace, out: Path, layout: ClassLayout, num_images: int,
           grid_rows: list[list[int]], npz_done: bool) -> None:
    """Once every image exists: the grid, the npz, and the PNGs removed if only the npz is kept."""
    if grid_rows:
        images = torch.stack([torch.from_numpy(read_png(png_path(out, k))).permute(2, 0, 1)
                              for row in grid_rows for k in row])
        save_labelled_grid(images, [str(layout(row[0])) for row in grid_rows], args.grid)
    if args.format != "png" and not npz_done:
        write_npz(out, num_images, layout)
    if args.format == "npz":
        shutil.rmtree(out / IMAGES_DIR)


def grid_indices(layout: ClassLayout, num_images: int, rows: int = 10, cols: int = 8) -> list[list[int]]:
    """Image indices of a grid: the first `cols` images of each of the first `rows` class blocks."""
    cols = min(cols, layout.per_class, num_images)
    blocks = [[b * layout.per_class + j for j in range(cols)] for b in range(min(rows, len(layout.classes)))]
    return [block for block in blocks if block[-1] < num_images]
