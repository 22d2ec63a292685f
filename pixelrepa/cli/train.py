"""Train a JiT with alignment none, REPA or PixelREPA (CPU, one GPU, torchrun or SLURM).

Re-running the same command resumes from the run folder's latest checkpoint. --init-from
starts a new run (step 0, a run folder without checkpoints) from a released
checkpoint-last.pth: its raw weights, both EMAs, the adapter and, where it provably fits,
the optimizer state; the configuration is still this command's and must fit the weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixelrepa.cli.common import add_config_arguments, resolve_config


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", help="data.source: a pack folder, an image folder, mnist or fashion-mnist")
    parser.add_argument("--out", help="train.out_dir: the run folder")
    parser.add_argument("--steps", type=int, help="train.steps")
    parser.add_argument("--resume", type=Path, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="start a new run from a released checkpoint-last.pth")
    parser.add_argument("--encoder-weights", metavar="PATH",
                        help="align.encoder.weights: a local encoder file, e.g. from `pixelrepa import --encoder-out`")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    for flag, field in (("data", "data.source"), ("out", "train.out_dir"), ("steps", "train.steps"),
                        ("encoder_weights", "align.encoder.weights")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{field}={getattr(args, flag)}")
    config = resolve_config(args)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from pixelrepa.training.trainer import train

    summary = train(config, resume=args.resume, progress=not args.no_progress, init_from=args.init_from)
    if summary.rank == 0:
        print(f"trained to step {summary.steps}; run folder {summary.out_dir}; "
              f"last checkpoint {summary.last_checkpoint}")
    return 0
