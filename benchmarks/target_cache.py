"""What `align.target_cache` saves: training img/s with and without cached encoder targets.

Measured: tiny presets trained by the trainer on the CPU, on a pack of random 32-px images,
first without the cache (the encoder runs every step) and then with it (built once before the
timed run; its build time is reported apart); img/s from each run's own log, first window
dropped. Counted: for a preset at ImageNet scale (default PixelREPA-B/16 with DINOv2-B at
256 px, random weights), FLOPs of the encoder's forward per image against those of the
training step per image, the saving they bound (time taken as proportional to FLOPs), and the
cache's size on disk.

    python benchmarks/target_cache.py [--presets PixelREPA-Tiny/4 REPA-Tiny/4 PixelREPA-Micro/8]
                                      [--steps 60] [--batch 64] [--flops-preset PixelREPA-B/16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import count_flops, device_line
from flop_counts import training_step
from pixelrepa.align.encoders import build_encoder
from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.training.trainer import train


def timed_run(config) -> dict:
    started = time.perf_counter()
    train(config, progress=False)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (Path(config.train.out_dir) / "log.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in log if "img_per_s" in r][1:]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "wall": wall}


def measure(preset: str, steps: int, batch: int, workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    pack = workdir / f"pack-{preset.replace('/', '-')}"
    pack_arrays(rng.integers(0, 256, (2048, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 2048), pack,
                [str(c) for c in range(10)], source="random")
    base = get_preset(preset).replace(**{
        "data.source": str(pack), "data.num_workers": 0, "train.steps": steps, "train.per_device_batch": batch,
        "optim.global_batch": batch, "optim.lr": 1e-3, "train.log_every": 10, "train.ckpt_every": steps,
        "train.sample_every": None, "kernels.compile": "none"})
    without = timed_run(base.replace(**{"train.out_dir": str(workdir / f"{preset}-plain")}))
    started = time.perf_counter()
    train(base.replace(**{"train.out_dir": str(workdir / f"{preset}-build"), "train.steps": 1,
                          "align.target_cache": "auto"}), progress=False)
    build = time.perf_counter() - started
    cached = timed_run(base.replace(**{"train.out_dir": str(workdir / f"{preset}-cached"),
                                       "align.target_cache": "auto"}))
    return {"preset": preset, "without": without, "with": cached, "build_s": build,
            "images": 2048, "orientations": 2 if base.data.hflip else 1}


def counted(preset: str) -> dict:
    config = get_preset(preset)
    encoder = build_encoder(config.align.encoder, random_init=True).eval()
    m = config.model
    x = torch.rand(1, 3, m.input_size, m.input_size) * 2 - 1
    encoder_flops = count_flops(lambda: encoder(x, (m.grid_size, m.grid_size)))
    step_flops = count_flops(training_step(preset, 1))  # backbone + head, forward and backward, one image
    enc = config.align.encoder
    bytes_per_image = m.num_patches * enc.feature_dim * 4 * (2 if config.data.hflip else 1)
    return {"preset": preset, "encoder": f"{enc.name} at {enc.img_size} px", "encoder_flops": encoder_flops,
            "step_flops": step_flops, "bytes_per_image": bytes_per_image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["PixelREPA-Tiny/4", "REPA-Tiny/4", "PixelREPA-Micro/8"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--flops-preset", default="PixelREPA-B/16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(device_line(torch.device("cpu")))
    print(f"\nTrainer img/s on the CPU, batch {args.batch}, {args.steps} steps, eager (kernels.compile=none), "
          "2,048 random 32-px images; median (min-max) of the logged windows after the first\n")
    print("| preset | without the cache | with the cache | ratio | cache build (s) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            r = measure(preset, args.steps, args.batch, Path(tmp))
            w, c = r["without"], r["with"]
            print(f"| {preset} | {w['median']:.1f} ({w['min']:.1f}-{w['max']:.1f}) | {c['median']:.1f} "
                  f"({c['min']:.1f}-{c['max']:.1f}) | {c['median'] / w['median']:.2f}x | {r['build_s']:.1f} "
                  f"({r['images']} images x {r['orientations']} orientations) |")
    f = counted(args.flops_preset)
    share = f["encoder_flops"] / (f["encoder_flops"] + f["step_flops"])
    print(f"\nCounted (FlopCounterMode, one image): {f['preset']} with {f['encoder']}: encoder forward "
          f"{f['encoder_flops'] / 1e9:.1f} GFLOP, training step {f['step_flops'] / 1e9:.1f} GFLOP; the encoder is "
          f"{share:.1%} of a step's FLOPs, so the cache saves at most that share of the time "
          f"(at most {1 / (1 - share):.2f}x img/s). Cache on disk, float32: {f['bytes_per_image'] / 2**10:.0f} KiB "
          f"per image ({f['bytes_per_image'] * 1_281_167 / 2**40:.2f} TiB for ImageNet's 1,281,167; bfloat16 half).")


if __name__ == "__main__":
    main()
