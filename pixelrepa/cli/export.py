"""Export a sampling model file (one EMA backbone and its config) from a training checkpoint.

The adapter, projector, raw weights and optimiser state are left behind (SPEC 6)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelrepa.checkpoint import export_sampling_checkpoint, find_checkpoint


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("output", type=Path, help="model file to write (.safetensors)")
    parser.add_argument("--ema", type=int, default=1, help="which EMA: 1 (decay 0.9999, default) or 2 (0.9996)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.force:
        raise ValueError(f"{args.output} exists; pass --force to overwrite it")
    source = find_checkpoint(args.checkpoint)
    path = export_sampling_checkpoint(source, args.output, ema=args.ema)
    print(f"wrote {path}: EMA {args.ema} backbone from {source}")
    return 0
