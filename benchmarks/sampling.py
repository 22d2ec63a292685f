"""Sampling throughput: whole Heun trajectories with CFG on an interval, fast vs reference.

fast:      one batched conditional + unconditional forward, no unconditional pass where the
           scale is 1 (outside the interval), oneDNN linears on the CPU, the whole network
           compiled and captured in CUDA graphs on GPU (the config defaults)
reference: pixelrepa.config.REFERENCE_PATH: two forwards at every step, also outside the
           interval, explicit float32 attention, per-block compile on GPU (as released)

img/s counts output images. FLOPs: one forward counted with FlopCounterMode, times the
network images each path actually evaluates (printed per image).
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable

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
from pixelrepa.models.jit import JiT
from pixelrepa.models.layers import set_attention_impl
from pixelrepa.sampling import sample
from pixelrepa.device import apply_kernels, autocast_for


def build_net(config: RunConfig, device: torch.device) -> JiT:
    torch.manual_seed(0)  # the same weights on every path
    net = JiT(config.model).to(device).eval()
    randomise_zero_layers(net)
    apply_kernels(net, net.blocks, config.kernels, device, sampling=True)
    return net


def trajectory(config: RunConfig, net: JiT, noise: torch.Tensor, labels: torch.Tensor,
               device: torch.device, counter: list[int]) -> Callable[[], None]:
    """One whole trajectory; `counter` receives the network images it evaluated."""
    m = config.model

    def run() -> None:
        calls = []

        def counted(z, t, y):
            calls.append(z.shape[0])
            return net(z, t, y)

        with autocast_for(device):
            sample(counted, noise, labels, m.num_classes, config.sampler, config.objective.t_eps)
        counter[:] = [sum(calls)]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_flags(parser)
    add_kernel_flags(parser)
    parser.add_argument("--preset", default="JiT-B/16")
    parser.add_argument("--batch", type=int, default=None, help="images per trajectory (default: 2 CPU, 128 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: 5 CPU, 50 GPU)")
    parser.add_argument("--method", choices=["heun", "euler"], default="heun")
    parser.add_argument("--interval", type=float, nargs=2, default=(0.1, 1.0))
    parser.add_argument("--no-cuda-graphs", action="store_true", help="fast path without CUDA graphs")
    args = parser.parse_args()
    device = setup(args)
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 2)
    steps = args.steps or (50 if on_gpu else 5)

    sampler = {"sampler.steps": steps, "sampler.method": args.method,
               "sampler.interval_min": args.interval[0], "sampler.interval_max": args.interval[1]}
    fast = {**fast_overrides(args), **({"kernels.cuda_graphs": False} if args.no_cuda_graphs else {})}
    base = get_preset(args.preset).replace(**sampler)
    paths = {"fast": base.replace(**fast), "reference": base.replace(**reference_overrides(device))}
    peak, peak_note = matmul_rate(device)
    print(device_line(device))
    print(f"MFU against the measured matmul rate: {peak / 1e12:.2f} TFLOP/s ({peak_note})")
    print(f"{args.preset}, {args.method}-{steps}, cfg {base.sampler.cfg_scale} on {tuple(args.interval)}, "
          f"batch {batch}; fast path overrides: {fast or 'none (config defaults)'}")

    m = base.model
    g = torch.Generator(device=device).manual_seed(1)
    noise = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g, device=device)
    labels = torch.randint(m.num_classes, (batch,), generator=g, device=device)
    with sdpa_backend(args.sdpa_backend):
        nets = {name: build_net(config, device) for name, config in paths.items()}
        reference_net = JiT(m).to(device).eval()
        set_attention_impl(reference_net, "reference")
        reference_net.load_state_dict(nets["reference"].state_dict())
        with torch.no_grad(), autocast_for(device):
            t = torch.full((batch,), 0.5, device=device)
            forward_flops = count_flops(functools.partial(reference_net, noise, t, labels)) / batch  # per network image
        del reference_net
        counters = {name: [0] for name in paths}
        runs, peaks = {}, {}
        for name, config in paths.items():
            runs[name] = trajectory(config, nets[name], noise, labels, device, counters[name])
            reset_peak_memory(device)
            runs[name]()  # warm-up (compilation, graph capture)
            synchronize(device)
            peaks[name] = peak_memory(device)
        times = time_alternating(runs, 0, args.repeats or (3 if on_gpu else 2), device)

    rows = []
    stats = {name: Stats.of(t) for name, t in times.items()}
    for name, s in stats.items():
        evaluated = counters[name][0]
        rows.append([args.preset, name, str(batch), f"{evaluated / batch:.0f}", s.cell(), f"{batch / s.median:.2f}",
                     *rate_cells(int(forward_flops * evaluated), s.median, peak), peaks[name],
                     f"{stats['reference'].median / s.median:.2f}x"])
    print(f"{forward_flops / 1e9:.3g} GFLOP per network image (FlopCounterMode)\n")
    print(markdown_table(["sampling", "path", "batch", "net evals per image", "s/trajectory median (min-max)",
                          "img/s", "TFLOP/s", "MFU", "peak memory", "speed-up vs reference"], rows))


if __name__ == "__main__":
    main()
