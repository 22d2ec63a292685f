"""Sample a labelled image grid (PNG, one row per class) from a pixelrepa model file."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pixelrepa.config import apply_overrides
from pixelrepa.data.idx import to_uint8
from pixelrepa.evaluation.images import save_labelled_grid
from pixelrepa.models.jit import JiT
from pixelrepa.sampling import sample
from pixelrepa.training.loop import autocast_for, pick_device
from pixelrepa.weights import load_model_file


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="a pixelrepa model file (.safetensors)")
    parser.add_argument("output", type=Path, help="PNG to write")
    parser.add_argument("--classes", type=int, nargs="+", help="class indices (default: up to the first 10)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's config)")
    parser.add_argument("--method", choices=["heun", "euler"])
    parser.add_argument("--cfg", type=float, help="guidance scale")
    parser.add_argument("--interval", type=float, nargs=2, metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    config, groups, _ = load_model_file(args.model)
    overrides = {}
    for field, value in (("steps", args.steps), ("method", args.method), ("cfg_scale", args.cfg)):
        if value is not None:
            overrides[f"sampler.{field}"] = value
    if args.interval:
        overrides.update({"sampler.interval_min": args.interval[0], "sampler.interval_max": args.interval[1]})
    config = apply_overrides(config, overrides)
    classes = args.classes or list(range(min(10, config.model.num_classes)))
    bad = [c for c in classes if not 0 <= c < config.model.num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} outside [0, {config.model.num_classes})")
    device = pick_device()
    net = JiT(config.model)
    net.load_state_dict(groups["net"])
    net.to(device).eval()
    images = sample_classes(net, config, classes, args.per_class, args.seed, device)
    save_labelled_grid(images, [str(c) for c in classes], args.output)
    print(f"wrote {args.output}: {len(classes)} classes x {args.per_class}, {config.sampler.method} "
          f"{config.sampler.steps} steps, CFG {config.sampler.cfg_scale}")
    return 0


def sample_classes(net: JiT, config, classes: list[int], per_class: int, seed: int,
                   device: torch.device) -> torch.Tensor:
    """uint8 (len(classes) * per_class, C, H, W), class-major, from fixed seeded noise."""
    m = config.model
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), m.in_channels, m.input_size, m.input_size, generator=generator)
    noise = (noise * config.objective.noise_scale).to(device)
    with autocast_for(device):
        x = sample(net, noise, labels, m.num_classes, config.sampler, config.objective.t_eps)
    return to_uint8(x).cpu()
