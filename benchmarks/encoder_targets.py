"""Encoder target time: the frozen encoder's patch features for one batch of clean images.

Variants (each row timed against the first): float32 eager (NCHW weights, torch's BLAS
linears: the reference path); on GPU bf16 autocast, then bf16 autocast as the trainer runs it
(channels-last weights, the encoder compiled); on the CPU float32 with oneDNN linears, then as
the trainer runs it (channels-last weights and oneDNN linears; eager, and compiled as in runs of
kernels.cpu_compile_min_steps or more). Weights are random (no
download): the time does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from common import (
    Stats,
    add_device_flags,
    count_flops,
    device_line,
    markdown_table,
    matmul_rate,
    peak_memory,
    rate_cells,
    reset_peak_memory,
    setup,
    synchronize,
    time_alternating,
)
from pixelrepa.align.encoders import build_encoder
from pixelrepa.config import KernelConfig, get_encoder_preset
from pixelrepa.models.onednn import use_onednn_linears
from pixelrepa.device import kernels_for_run, prepare_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_flags(parser)
    parser.add_argument("--encoder", default="dinov2-b", help="an encoder preset (pixelrepa.config.ENCODER_PRESETS)")
    parser.add_argument("--img-size", type=int, default=256, help="training resolution (released: 256)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: 2 CPU, 128 GPU)")
    args = parser.parse_args()
    device = setup(args)
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 2)
    cfg = get_encoder_preset(args.encoder, args.img_size)
    grid = (args.img_size // 16, args.img_size // 16)
    x = torch.rand(batch, 3, args.img_size, args.img_size, device=device) * 2 - 1

    def variant(bf16: bool, onednn: bool = False, as_trainer: bool = False, run_steps: int | None = None):
        torch.manual_seed(0)
        encoder = build_encoder(cfg, random_init=True).to(device)
        if onednn:
            use_onednn_linears(encoder)
        if as_trainer:
            prepare_encoder(encoder, kernels_for_run(KernelConfig(), device, run_steps), device)
        cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        def run() -> None:
            with cast:
                encoder(x, grid)

        return run

    variants = {"float32": variant(False)}
    if on_gpu:
        variants["bf16 autocast"] = variant(True)
        variants["bf16 autocast, channels-last, compiled (trainer)"] = variant(True, as_trainer=True)
    else:
        variants["float32 + oneDNN linears"] = variant(False, onednn=True)
        long_run = KernelConfig().cpu_compile_min_steps
        variants[f"float32, channels-last + oneDNN linears (trainer, run < {long_run} steps)"] = \
            variant(False, as_trainer=True)
        variants[f"the same compiled (trainer, run >= {long_run} steps)"] = \
            variant(False, as_trainer=True, run_steps=long_run)

    peak, peak_note = matmul_rate(device)
    print(device_line(device))
    print(f"MFU against the measured matmul rate: {peak / 1e12:.2f} TFLOP/s ({peak_note})")
    flops = count_flops(variants["float32"])
    print(f"{cfg.name} at {args.img_size} px (patch {cfg.patch_size}), batch {batch}: "
          f"{flops / batch / 1e9:.1f} GFLOP per image (FlopCounterMode)")
    peaks = {}
    for name, run in variants.items():
        reset_peak_memory(device)
        for _ in range(args.warmup or 2):
            run()
        synchronize(device)
        peaks[name] = peak_memory(device)
    times = time_alternating(variants, 0, args.repeats or 5, device)
    stats = {name: Stats.of(t) for name, t in times.items()}
    first = next(iter(stats.values())).median
    rows = [[args.encoder, name, str(batch), s.cell(), f"{batch / s.median:.1f}", *rate_cells(flops, s.median, peak),
             peaks[name], f"{first / s.median:.2f}x"] for name, s in stats.items()]
    print()
    print(markdown_table(["encoder targets", "variant", "batch", "s/batch median (min-max)", "img/s", "TFLOP/s", "MFU",
                          "peak memory", "speed-up vs float32"], rows))


if __name__ == "__main__":
    main()
