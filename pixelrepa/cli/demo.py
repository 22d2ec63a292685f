"""Offline end-to-end demo: train a tiny PixelREPA on MNIST / Fashion-MNIST, sample a grid.

Reads the IDX files installed offline, aligns a tiny JiT to the ImageNet-trained
EfficientNet-Lite0 (features cached once for the fixed data set), trains with a progress
bar, then writes the EMA model file, a labelled sample grid and a loss log."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from pixelrepa.align.heads import build_align_head
from pixelrepa.cli.sample import sample_classes
from pixelrepa.config import EMAConfig, RunConfig, apply_overrides, get_preset
from pixelrepa.data.idx import load_idx_dataset
from pixelrepa.evaluation.images import save_labelled_grid
from pixelrepa.models.jit import JiT, count_parameters
from pixelrepa.training.device import pick_device
from pixelrepa.training.loop import LoopSettings, build_state, cached_encoder_targets, train
from pixelrepa.weights import save_model_file


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default ./demo)")
    parser.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    parser.add_argument("--data-dir", type=Path, help="folder with the IDX .gz files (default: installed)")
    parser.add_argument("--preset", default="PixelREPA-Tiny/4",
                        help="a 32-px preset: PixelREPA-/REPA-/JiT-Tiny/4 or -Micro/8")
    parser.add_argument("--images", type=int, default=12_000, help="training images used (features cached)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-weights", help="local EfficientNet-Lite0 weights (default: the packaged file)")


def demo_config(args: argparse.Namespace) -> RunConfig:
    config = get_preset(args.preset)
    if config.model.input_size != 32:
        raise ValueError(f"the demo trains 32-px presets; {args.preset} is {config.model.input_size} px")
    overrides = {
        "ema": EMAConfig(decays=config.ema.decays, warmup=True),  # short run: warm-up the averages
        "sampler.steps": args.sample_steps,
        "sampler.cfg_scale": args.cfg,
    }
    if args.encoder_weights:
        overrides["align.encoder.weights"] = args.encoder_weights
    return apply_overrides(config, overrides)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config = demo_config(args)
    device = pick_device()
    torch.manual_seed(args.seed)
    images, labels, class_names = load_idx_dataset(args.dataset, "train", config.model.input_size, args.data_dir)
    if config.model.num_classes != len(class_names):
        raise ValueError(f"{args.preset} has {config.model.num_classes} classes, {args.dataset} {len(class_names)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:args.images]
    images, labels = images[order], labels[order]
    print(f"data          {args.dataset}: {len(images)} training images, {config.model.input_size} px, "
          f"{len(class_names)} classes")

    targets = None
    if config.align.mode != "none":
        enc = config.align.encoder
        cache = args.out / f"targets-{args.dataset}-{len(images)}-seed{args.seed}-{enc.name}-{enc.img_size}-s{enc.stage}.safetensors"
        targets = cached_encoder_targets(config, images, cache, device)
        print(f"targets       {enc.name} at {enc.img_size} px, stage {enc.stage}: {tuple(targets.shape[1:])} per image")

    net = JiT(config.model).to(device)
    head = build_align_head(config.model, config.align)
    head = head.to(device) if head is not None else None
    print(f"model         {args.preset}: {count_parameters(net) / 1e6:.2f}M backbone"
          + (f" + {count_parameters(head) / 1e6:.2f}M {type(head).__name__}" if head is not None else "")
          + f", alignment {config.align.mode}, device {device}")
    state = build_state(config, net, head, args.lr)
    settings = LoopSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=args.warmup_steps, seed=args.seed)
    train(config, state, images, labels, targets, settings)

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    log_path.write_text("".join(json.dumps(r) + "\n" for r in state.history))
    with state.ema.swapped_in(net, 0):
        net.eval()
        model_path = save_model_file(args.out / "model.safetensors", config, {"net": net.state_dict()},
                                     provenance={"weights": "ema1", "steps": str(state.step), "dataset": args.dataset})
        grid = sample_classes(net, config, list(range(len(class_names))), args.per_class, args.seed, device)
    grid_path = save_labelled_grid(grid, list(class_names), args.out / "samples.png")

    first, last = state.history[0], state.history[-1]
    print(f"loss          step 1: {first['total']:.4f} -> step {last['step']}: {last['total']:.4f} "
          f"(denoise {last['denoise']:.4f}" + (f", align {last['align']:.4f})" if "align" in last else ")"))
    print(f"samples       {grid_path}  (EMA weights, {config.sampler.method} {config.sampler.steps} steps, "
          f"CFG {config.sampler.cfg_scale})")
    print(f"model file    {model_path}")
    print(f"loss log      {log_path}")
    print(f"wall time     {time.perf_counter() - started:.0f} s")
    return 0
