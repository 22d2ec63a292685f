"""Training step time: the fast path against the reference path, in one process.

fast:      the config defaults (SDPA attention on GPU and explicit matmuls on the CPU, oneDNN
           linears on the CPU, fused AdamW, torch.compile of the whole model on GPU and, on the
           CPU, for runs of at least kernels.cpu_compile_min_steps), changed by the flags below.
           With the defaults on the CPU two fast paths are timed: a short run's (eager) and a
           long run's (compiled).
reference: pixelrepa.config.REFERENCE_PATH, what the released code does (explicit float32
           attention, torch's BLAS linear, default AdamW, per-block compile on GPU only)

A step is draw_randomness + training_loss (backbone and alignment head) + backward + AdamW,
through the trainer's own wrapper (`wrap_for_training`, one process) and optimizer.
Random tensors stand in for the images and the frozen encoder's targets. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple

import torch

from common import (
    Stats,
    add_device_flags,
    add_kernel_flags,
    count_flops,
    device_line,
    fast_overrides,
    markdown_table,
    matmul_rate,
    peak_memory,
    randomise_zero_layers,
    rate_cells,
    reference_overrides,
    reset_peak_memory,
    sdpa_backend,
    setup,
    synchronize,
    time_alternating,
)
from pixelrepa.config import RunConfig, get_preset
from pixelrepa.objective import draw_randomness
from pixelrepa.device import autocast_for, kernels_for_run
from pixelrepa.training.module import TrainingModule
from pixelrepa.training.optim import make_optimizer
from pixelrepa.distributed import World
from pixelrepa.training.parallel import wrap_for_training


class Case(NamedTuple):
    group: str
    preset: str
    batch: int
    warmup: int
    repeats: int


CASES = [
    Case("tiny", "PixelREPA-Micro/8", 32, 5, 30),
    Case("tiny", "PixelREPA-Tiny/4", 32, 5, 30),
    Case("b16", "PixelREPA-B/16", 2, 2, 5),
]


def train_step(config: RunConfig, batch: int, device: torch.device, checkpointing: bool,
               run_steps: int | None = None) -> Callable[[], None]:
    """One training step of `config` on random data, as in a run of `run_steps` steps (which
    compile='auto' looks at on the CPU); same weights and inputs for every path."""
    torch.manual_seed(0)
    module = TrainingModule(config)
    randomise_zero_layers(module.net, module.head)
    info = World(rank=0, world_size=1, local_rank=0, device=device)
    model = wrap_for_training(module, "ddp", info, checkpointing, kernels_for_run(config.kernels, device, run_steps))
    optimizer = make_optimizer(model, config)
    m = config.model
    x = torch.rand(batch, m.in_channels, m.input_size, m.input_size, device=device) * 2 - 1
    y = torch.randint(m.num_classes, (batch,), device=device)
    target = torch.randn(batch, m.num_patches, config.align.encoder.feature_dim, device=device)

    def step() -> None:
        draws = draw_randomness(x, y, m.num_classes, m.num_patches, config.objective, config.align)
        with autocast_for(device):
            losses = model(x, draws, target)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_flags(parser)
    add_kernel_flags(parser)
    parser.add_argument("--only", choices=["tiny", "b16"], default=None, help="one group of the default cases")
    parser.add_argument("--preset", default=None, help="time this preset instead of the default cases")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch for --preset")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (both paths)")
    parser.add_argument("--no-reference", action="store_true", help="time the fast path only")
    args = parser.parse_args()
    device = setup(args)

    cases = [c for c in CASES if args.only in (None, c.group)]
    if args.preset:
        cases = [Case("custom", args.preset, args.batch or 2, 2, 5)]
    peak, peak_note = matmul_rate(device)
    print(device_line(device))
    print(f"MFU against the measured matmul rate: {peak / 1e12:.2f} TFLOP/s ({peak_note})")
    fast = fast_overrides(args)
    print(f"fast path overrides: {fast or 'none (config defaults)'}; SDPA backend {args.sdpa_backend}; "
          f"activation checkpointing {args.checkpointing}")

    rows = []
    for case in cases:
        base = get_preset(case.preset)
        long_run = base.kernels.cpu_compile_min_steps
        paths = {"fast": (base.replace(**fast), None)}
        if device.type == "cpu" and "kernels.compile" not in fast:
            paths = {f"fast, run < {long_run} steps": (base.replace(**fast), None),
                     f"fast, run >= {long_run} steps": (base.replace(**fast), long_run)}
        if not args.no_reference:
            paths["reference"] = (base.replace(**reference_overrides(device)), None)
        with sdpa_backend(args.sdpa_backend):
            steps, peaks = {}, {}
            for name, (config, run_steps) in paths.items():
                reset_peak_memory(device)
                steps[name] = train_step(config, case.batch, device, args.checkpointing, run_steps)
                for _ in range(args.warmup or case.warmup):  # compilation happens here
                    steps[name]()
                synchronize(device)
                peaks[name] = peak_memory(device)
            flops = count_flops(steps["reference" if "reference" in steps else next(iter(steps))])
            times = time_alternating(steps, 0, args.repeats or case.repeats, device)
        del steps
        stats = {name: Stats.of(t) for name, t in times.items()}
        for name, s in stats.items():
            ratio = f"{stats['reference'].median / s.median:.2f}x" if "reference" in stats else "-"
            rows.append([case.preset, name, str(case.batch), s.cell(), f"{case.batch / s.median:.1f}",
                         *rate_cells(flops, s.median, peak), peaks[name], ratio])
        print(f"{case.preset}: {flops / 1e9:.3g} GFLOP per step (FlopCounterMode)", flush=True)

    print()
    print(markdown_table(["training step", "path", "batch", "s/step median (min-max)", "img/s", "TFLOP/s", "MFU",
                          "peak memory", "speed-up vs reference"], rows))


if __name__ == "__main__":
    main()
