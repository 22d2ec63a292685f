"""Generate samples from a model file: a folder of PNGs and / or an npz, or one grid.

`pixelrepa sample MODEL OUT` writes OUT/images/{k:06d}.png and OUT/samples.npz (`arr_0`
uint8 (N, H, W, 3) and `labels`, the ADM evaluation layout): by default 50 images of every
class, class-major. Image k depends only on the model, the sampler settings, the seed and
k, so a run can be split over processes (`torchrun --nproc_per_node G pixelrepa sample
...`) and resumed: a rerun makes only the missing images. OUT/manifest.json records the
settings; a rerun with other settings is refused unless --overwrite.

With OUT ending in .png it writes just a labelled grid (one row per class, default the
first 10 classes x 8), the same images as 0.. of a folder run with those classes.

`--guide-model WEAKER` samples with autoguidance (Karras et al. 2024): inside the guidance interval
D = D_weak(z | c) + cfg * (D_model(z | c) - D_weak(z | c)), both conditional, with any --method and
--schedule. The guide is loaded like the model and must denoise the same images (image size, patch
grid, channels, classes, noise scale); its digest is part of the folder's settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelrepa.cli.common import add_sampler_arguments, describe_sampler, sampler_changes
from pixelrepa.device import pick_device
from pixelrepa.distributed import in_process_group
from pixelrepa.evaluation.sample_folder import SampleSettings, sample_grid, sample_to_folder
from pixelrepa.loading import MODEL_FILE_NAME


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help=f"a pixelrepa model file, a folder holding {MODEL_FILE_NAME}, "
                        "a training run / checkpoint folder (its EMA backbone) or a Hugging Face Hub id ORG/NAME")
    parser.add_argument("--ema", type=int, default=1, help="with a training run: EMA 1 (default) or 2")
    parser.add_argument("output", type=Path, help="output folder (or a .png path: just a labelled grid)")
    parser.add_argument("--num-images", type=int,
                        help="images to make (default: classes x per-class; more repeats the class layout)")
    parser.add_argument("--classes", type=int, nargs="+", help="class indices (default: all; grid: the first 10)")
    parser.add_argument("--per-class", type=int, help="consecutive images per class (default 50; grid: 8)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward batch, per process")
    add_sampler_arguments(parser)
    parser.add_argument("--guide-model", type=Path, metavar="WEAKER",
                        help="autoguidance: guide with this weaker model of the same data (an earlier checkpoint, "
                             "a smaller preset) instead of the unconditional pass; --cfg is its weight")
    parser.add_argument("--guide-ema", type=int, default=1, help="with a training run as guide: its EMA (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["png", "npz", "both"], default="both",
                        help="keep the PNGs, the npz or both (npz: the PNGs are removed once it is written)")
    parser.add_argument("--grid", type=Path, metavar="PATH.png", help="also write a labelled grid of the first images")
    parser.add_argument("--overwrite", action="store_true", help="replace samples made with other settings")


def run(args: argparse.Namespace) -> int:
    settings = SampleSettings(
        model=args.model, out=args.output, ema=args.ema, num_images=args.num_images,
        classes=None if args.classes is None else tuple(args.classes), per_class=args.per_class,
        batch_size=args.batch_size, seed=args.seed, format=args.format, grid=args.grid, overwrite=args.overwrite,
        sampler=sampler_changes(args), guide=args.guide_model, guide_ema=args.guide_ema)
    if settings.out.suffix.lower() == ".png":
        result = sample_grid(settings, pick_device())
        print(f"wrote {result.path}: {len(result.classes)} classes x {result.per_class}, "
              f"{describe_sampler(result.config)}")
        return 0
    result = in_process_group(lambda world: sample_to_folder(settings, world))
    if result is not None:
        print(f"{result.path}: {result.num_images} images ({result.made} made now, "
              f"{result.num_images - result.made} already there), {describe_sampler(result.config)}, "
              f"seed {settings.seed}")
    return 0
