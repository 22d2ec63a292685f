"""Offline end-to-end demo: the `PixelREPA-Demo` preset trained by `pixelrepa train`'s trainer.

Packs a fixed random subset of MNIST / Fashion-MNIST once (OUT/data/), trains with the
trainer (encoder targets cached beside the pack, checkpoints in OUT/run/, so an interrupted
demo resumes when run again), exports EMA 1 as OUT/model.safetensors and samples a labelled
grid (OUT/samples.png). The log is OUT/run/log.jsonl."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pixelrepa.config import RunConfig, apply_overrides, get_preset
from pixelrepa.data.idx import pack_idx_subset
from pixelrepa.sampling import sample_classes
from pixelrepa.images import save_labelled_grid
from pixelrepa.checkpoint import export_sampling_checkpoint, find_checkpoint
from pixelrepa.device import apply_kernels, pick_device
from pixelrepa.evaluation.live import live_validator
from pixelrepa.training.trainer import train
from pixelrepa.loading import load_model

PRESET = "PixelREPA-Demo"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default ./demo)")
    parser.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    parser.add_argument("--data-dir", type=Path, help="folder with the IDX .gz files (default: installed)")
    parser.add_argument("--images", type=int, default=6_000,
                        help="training images: a fixed random subset of the train split, packed once")
    parser.add_argument("--steps", type=int, help=f"training steps (default: the {PRESET} preset's)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class in the grid")
    parser.add_argument("--seed", type=int, default=0, help="subset, training and sampling seed")
    parser.add_argument("--encoder-weights", help="local EfficientNet-Lite0 weights (default: the packaged file)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change a field of the {PRESET} preset, e.g. --set sampler.cfg_scale=2.0")


def demo_config(args: argparse.Namespace, pack: Path) -> RunConfig:
    overrides = {"data.source": str(pack), "train.out_dir": str(args.out / "run"), "train.seed": args.seed}
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.encoder_weights:
        overrides["align.encoder.weights"] = args.encoder_weights
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sampler.cfg_scale=2.0")
        overrides[key.strip()] = value.strip()
    return apply_overrides(get_preset(PRESET), overrides)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    size = get_preset(PRESET).model.input_size
    pack = pack_idx_subset(args.dataset, args.images, args.seed,
                           args.out / "data" / f"{args.dataset}-{args.images}-seed{args.seed}", size, args.data_dir)
    config = demo_config(args, pack)
    print(f"data          {pack} ({args.images} {args.dataset} training images, {size} px)")
    summary = train(config, validator=live_validator(config))

    model_path = args.out / "model.safetensors"
    export_sampling_checkpoint(find_checkpoint(summary.out_dir), model_path, ema=1)
    device = pick_device()
    saved, net, _ = load_model(model_path, device=device)
    apply_kernels(net, net.blocks, dataclasses.replace(saved.kernels, compile="none"), device, sampling=True)
    class_names = json.loads((summary.out_dir / "classes.json").read_text())
    grid = sample_classes(net, saved, list(range(len(class_names))), args.per_class, args.seed, device)
    grid_path = save_labelled_grid(grid, class_names, args.out / "samples.png")

    metrics = summary.last_metrics
    print(f"loss          step {summary.steps}: {metrics.get('total', float('nan')):.4f} (denoise "
          f"{metrics.get('denoise', float('nan')):.4f}, align {metrics.get('align', float('nan')):.4f})")
    print(f"samples       {grid_path}  (EMA 1, {saved.sampler.method} {saved.sampler.steps} steps, "
          f"CFG {saved.sampler.cfg_scale})")
    print(f"model file    {model_path}")
    print(f"run folder    {summary.out_dir} (log.jsonl, checkpoints; re-run this command to resume)")
    print(f"wall time     {time.perf_counter() - started:.0f} s")
    return 0
