"""FID and KID between real Fashion-MNIST sets with the offline TF-Inception: the noise floor.

Two pairs, as the evaluation issue asks: 5,000 test images vs 10,000 train images, and the
two disjoint 5,000-image halves of those 10,000 train images. Inception features are computed
once per set (`pixelrepa eval ref-stats --keep-features`, cached in WORK) and every metric is
computed from them.

    python benchmarks/fid_fashion_mnist.py [--work /tmp/fid] [--size 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from pixelrepa.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    load_reference,
)


def pixelrepa(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pixelrepa.cli.main", *args], check=True)


def features(work: Path, split: str, count: int, size: int) -> tuple:
    pack, stats = work / f"{split}{count // 1000}k", work / f"{split}{count // 1000}k.npz"
    if not (pack / "manifest.json").is_file():
        pixelrepa("data", "prepare", "fashion-mnist", str(pack), "--split", split, "--limit", str(count),
                  "--size", str(size))
    started = time.perf_counter()
    if not stats.is_file():
        pixelrepa("eval", "ref-stats", str(pack), str(stats), "--keep-features", "--batch-size", "50")
    return load_reference(stats).features, time.perf_counter() - started


def row(name: str, a, b) -> str:
    started = time.perf_counter()
    fid = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    kid = kernel_inception_distance(a, b)
    return (f"| {name} | {len(a):,} vs {len(b):,} | {fid:.3f} | {kid['mean'] * 1e3:.3f} ± {kid['std'] * 1e3:.3f} "
            f"| {time.perf_counter() - started:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fid"))
    parser.add_argument("--size", type=int, default=32, help="image side the sets are packed at")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    test, test_time = features(args.work, "test", 5000, args.size)
    train, train_time = features(args.work, "train", 10000, args.size)
    print(f"machine   {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU float32")
    print(f"features  test 5k: {test_time:.0f} s, train 10k: {train_time:.0f} s (0 s = cached)")
    print("| sets | images | FID | KID x 1e3 (mean ± std, 100 subsets of 1,000) | metric time |")
    print("|---|---|---|---|---|")
    print(row("Fashion-MNIST test vs train", test, train))
    print(row("train halves (first 5k vs next 5k)", train[:5000], train[5000:]))


if __name__ == "__main__":
    main()
