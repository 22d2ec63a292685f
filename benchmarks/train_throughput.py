"""Training throughput: 1 process vs N processes under torchrun, DDP or FSDP2.

Runs `pixelrepa train` on a packed set of random images, reads the img/s (and on a GPU the
peak device memory) that the run itself logs (rank 0's log.jsonl, first logging window dropped
as warm-up), and the peak resident memory of the processes. Same global batch in every setting.
On the CPU the processes are gloo ranks sharing the cores; with `--device cuda` one process per
GPU (NCCL), `--procs` at most the GPU count (with one GPU only the 1-process setting runs, and a
single process is not wrapped: the figure is the trainer's, not DDP's or FSDP2's).

    python benchmarks/train_throughput.py [--preset PixelREPA-Tiny/4] [--steps 60] [--procs 2]
    python benchmarks/train_throughput.py --device cuda --preset PixelREPA-B/16 --image-size 256 \
        --global-batch 128 --parallel fsdp2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays

from common import cpu_model


_PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run(config, procs: int, workdir: Path, threads: int, device: str) -> dict:
    config_path = workdir / f"config-{procs}.json"
    config_path.write_text(json.dumps(config.to_dict()))
    train = ["-m", "pixelrepa.cli.main", "train", "--config", str(config_path), "--no-progress"]
    if procs == 1:
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # A wrapper process per setting, so that its RUSAGE_CHILDREN peak covers that setting only.
    measured = [sys.executable, "-c", _PEAK_RSS, *command]
    started = time.perf_counter()
    done = subprocess.run(measured, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    log = [json.loads(line) for line in (Path(config.train.out_dir) / "log.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in log[1:]]
    return {"procs": procs, "threads": threads, "img_s_median": statistics.median(rates),
            "img_s_min": min(rates), "img_s_max": max(rates), "wall_s": wall,
            "peak_rss_mib": peak_kib / 1024, "gpu_mem_gib": max((r.get("gpu_mem_gib", 0) for r in log), default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="PixelREPA-Tiny/4")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    settings = [1, args.procs]
    if args.device == "cuda":
        settings = sorted({1, min(args.procs, torch.cuda.device_count())})
    size = args.image_size or get_preset(args.preset).model.input_size
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rng = np.random.default_rng(0)
        pack = workdir / "pack"
        count = max(2048, args.global_batch * 8)
        pack_arrays(rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8), rng.integers(0, 10, count), pack,
                    [str(c) for c in range(10)], source="random")
        results = []
        for procs in settings:
            config = get_preset(args.preset).replace(**{
                "data.source": str(pack), "data.num_workers": 0, "train.out_dir": str(workdir / f"run-{procs}"),
                "train.steps": args.steps, "train.per_device_batch": args.global_batch // procs,
                "train.log_every": 10, "train.ckpt_every": args.steps, "train.sample_every": None,
                "optim.global_batch": args.global_batch, "optim.lr": 1e-3, "train.parallel": args.parallel,
                "model.num_classes": 10, "model.input_size": size,
            })
            # The cores are shared out: one process gets all of them, N processes 1/N each.
            results.append(run(config, procs, workdir, max(1, cores // procs), args.device))
    if args.device == "cuda":
        print(f"machine   {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}, "
              f"bf16 autocast, NCCL, {args.parallel}")
    else:
        print(f"machine   {cpu_model()}, {cores} cores, torch {torch.__version__}, CPU float32, gloo, {args.parallel}")
    print(f"run       {args.preset}, global batch {args.global_batch}, {args.steps} steps, "
          "img/s from the run's own log (first window dropped)")
    print(f"{'processes':>9} {'threads/proc':>12} {'img/s median':>13} {'min':>7} {'max':>7} {'wall s':>7} "
          f"{'peak RSS MiB':>13} {'GPU GiB':>8}")
    for r in results:
        print(f"{r['procs']:>9} {r['threads']:>12} {r['img_s_median']:>13.1f} {r['img_s_min']:>7.1f} "
              f"{r['img_s_max']:>7.1f} {r['wall_s']:>7.1f} {r['peak_rss_mib']:>13.0f} {r['gpu_mem_gib']:>8.2f}")
    if len(results) > 1:
        print(f"ratio     {results[1]['img_s_median'] / results[0]['img_s_median']:.2f}x "
              f"({results[1]['procs']} processes vs 1); peak RSS is the largest single process")


if __name__ == "__main__":
    main()
