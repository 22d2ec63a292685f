"""Benchmarks that train: `pixelrepa bench convergence` (plain JiT vs REPA vs PixelREPA).

  pixelrepa bench convergence [--scale cpu|gpu] [--dataset fashion-mnist|mnist] --out DIR

Trains one 32-px preset three times (alignment none | repa | pixelrepa) with identical seed,
data order, steps and batch, aligning to the offline ImageNet EfficientNet-Lite0, and scores the
EMA backbone along the way with KID and FID (offline TF-Inception, real train images as the
reference). DIR gets convergence.csv, .md, .json and .png; re-running the same command resumes.
`--report` rewrites DIR's tables and plot from its results. `--scale cpu` fits about 1.75 hours on a 2-core CPU; `--scale gpu` is the larger setting. Any
setting can be overridden (see `pixelrepa.evaluation.convergence.ConvergenceConfig`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pixelrepa.evaluation import convergence
from pixelrepa.evaluation.inception import cache_dir
from pixelrepa.training.device import pick_device


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("benchmark", choices=["convergence"])
    parser.add_argument("--scale", choices=sorted(convergence.SCALES), default="cpu",
                        help="preset sizes: cpu (default, about 1.75 h on 2 cores) or gpu")
    parser.add_argument("--out", type=Path, required=True, help="results folder (tables, plot, JSON)")
    parser.add_argument("--cache", type=Path, help="reference features and encoder targets "
                        "(default $PIXELREPA_CACHE/convergence or ~/.cache/pixelrepa/convergence)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite DIR's tables, plot and JSON from its results (no training)")
    parser.add_argument("--arms", nargs="+", choices=convergence.ARMS, default=list(convergence.ARMS),
                        help="which runs to do now, in this order (default: none repa pixelrepa); "
                             "the tables hold every finished run of DIR")
    overrides = parser.add_argument_group("overrides of the scale's settings")
    for field in dataclasses.fields(convergence.ConvergenceConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(convergence.SCALES["cpu"], field.name)
        if isinstance(default, tuple):
            overrides.add_argument(flag, type=int, nargs="+", metavar="N")
        else:
            overrides.add_argument(flag, type=type(default), metavar=type(default).__name__.upper())


def run(args: argparse.Namespace) -> int:
    import torch

    if args.report:
        convergence.report(args.out)
        print(f"results       {args.out}/convergence.md, .csv, .json, .png")
        return 0
    changes = {}
    for field in dataclasses.fields(convergence.ConvergenceConfig):
        value = getattr(args, field.name)
        if value is not None:
            changes[field.name] = tuple(value) if isinstance(value, list) else value
    settings = dataclasses.replace(convergence.SCALES[args.scale], **changes)
    device = torch.device(args.device) if args.device else pick_device()
    cache = args.cache or cache_dir() / "convergence"
    convergence.run(settings, args.out, cache, device, scale=args.scale, progress=not args.no_progress,
                    arms=tuple(args.arms))
    print(f"results       {args.out}/convergence.md, .csv, .json, .png")
    return 0
