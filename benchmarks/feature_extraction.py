"""Inception feature extraction (FID, KID, precision/recall): NCHW against channels-last weights.

    python benchmarks/feature_extraction.py [--batch 50] [--size 32] [--device cpu|cuda]

The offline TF-Inception (torch-fidelity's Inception-v3 with the converted weights) on one batch
of random uint8 images, resized inside the network to 299 px: as torch-fidelity builds it (NCHW),
then with its weights in channels-last layout, which `pixelrepa.evaluation.inception.load_extractor`
uses on the CPU (oneDNN's blocked convolutions skip the layout conversions). Prints seconds per
batch, images per second and the largest feature difference between the two.
"""

from __future__ import annotations

import argparse

import torch

from common import Stats, add_device_flags, device_line, markdown_table, setup, time_alternating
from pixelrepa.evaluation import inception


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_flags(parser)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--size", type=int, default=32, help="image side before the network's resize to 299")
    args = parser.parse_args()
    device = setup(args)
    layouts = {"NCHW": inception.load_extractor(device, channels_last=False),
               "channels-last": inception.load_extractor(device, channels_last=True)}
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        features = {name: net(images)[0] for name, net in layouts.items()}
        gap = (features["NCHW"] - features["channels-last"]).abs().max().item()
        scale = features["NCHW"].abs().max().item()
        times = time_alternating({name: (lambda net=net: net(images)) for name, net in layouts.items()},
                                 args.warmup or 1, args.repeats or 5, device)
    stats = {name: Stats.of(t) for name, t in times.items()}
    print(device_line(device))
    print(f"batch {args.batch} of {args.size}-px uint8 images; largest feature difference {gap:.2e} "
          f"(features up to {scale:.2f})")
    print()
    print(markdown_table(["Inception layout", "s/batch median (min-max)", "img/s", "speed-up vs NCHW"],
                         [[name, s.cell(), f"{args.batch / s.median:.1f}", f"{stats['NCHW'].median / s.median:.2f}x"]
                          for name, s in stats.items()]))


if __name__ == "__main__":
    main()
