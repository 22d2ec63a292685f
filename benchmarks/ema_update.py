"""EMA update time: both moving averages of a backbone's parameters after one optimizer step.

fast:      BackboneEMA.update (one torch._foreach_lerp_ per decay over all parameters)
reference: the released code's loop, per parameter and decay: ema.mul_(d).add_(p, alpha=1 - d)

An update reads each parameter and shadow and writes the shadow: 12 bytes per parameter
and decay in float32, so it is bound by memory bandwidth (measured here with a large in-place add).
"""

from __future__ import annotations

import argparse

import torch

from common import Stats, add_device_flags, device_line, markdown_table, memory_bandwidth, setup, time_alternating
from pixelrepa.config import EMAConfig, get_preset
from pixelrepa.models.jit import JiT
from pixelrepa.training.ema import BackboneEMA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_flags(parser)
    parser.add_argument("--preset", default="JiT-B/16")
    args = parser.parse_args()
    device = setup(args)
    net = JiT(get_preset(args.preset).model).to(device)
    config = EMAConfig()
    ema = BackboneEMA(net, config)
    shadows = [[p.detach().clone() for p in net.parameters()] for _ in config.decays]
    params = [p.detach() for p in net.parameters()]

    def released() -> None:
        with torch.no_grad():
            for decay, shadow in zip(config.decays, shadows):
                for s, p in zip(shadow, params):
                    s.mul_(decay).add_(p, alpha=1 - decay)

    bandwidth = memory_bandwidth(device)
    count = sum(p.numel() for p in params)
    moved = 12 * count * len(config.decays)
    print(device_line(device))
    print(f"{args.preset}: {count / 1e6:.1f}M parameters, {len(config.decays)} decays, {moved / 1e9:.2f} GB moved per "
          f"update; measured in-place add bandwidth {bandwidth / 1e9:.1f} GB/s")
    times = time_alternating({"fast": lambda: ema.update(net), "reference": released}, args.warmup or 2,
                             args.repeats or 10, device)
    stats = {name: Stats.of(t) for name, t in times.items()}
    rows = [[args.preset, name, s.cell(), f"{moved / s.median / 1e9:.1f}", f"{100 * moved / s.median / bandwidth:.0f}%",
             f"{stats['reference'].median / s.median:.2f}x"] for name, s in stats.items()]
    print()
    print(markdown_table(["EMA update", "path", "s/update median (min-max)", "GB/s", "of add bandwidth",
                          "speed-up vs reference"], rows))


if __name__ == "__main__":
    main()
