"""FLOP and byte counts of a training step and a sampling step at the real shapes, and the
floors they imply on a given accelerator (default: H100 SXM, 989 TFLOP/s dense bf16,
3.35 TB/s HBM). Runs on the CPU; no GPU needed.

Counted on the eager reference path (explicit attention) under bf16 autocast, so that the
tensor sizes are those of a GPU run:
- FLOPs with torch.utils.flop_counter.FlopCounterMode;
- bytes with a dispatch mode that adds up the sizes of every operator's tensor inputs and
  outputs (views excluded): the traffic of an unfused run, an upper bound;
- each count at batch 1 and 2, split into a per-image part and a per-step part (weights,
  gradients, optimizer state), then evaluated at the requested batch.
The lower bound on bytes is the per-step parameter traffic alone: float32 weights read in
forward and backward, gradients written, AdamW reading weight, gradient and both moments and
writing weight and moments (40 bytes per trainable parameter); for sampling, the weights
read once per forward.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from common import count_flops, markdown_table, randomise_zero_layers
from pixelrepa.config import get_preset
from pixelrepa.models.jit import JiT
from pixelrepa.models.layers import set_attention_impl
from pixelrepa.objective import draw_randomness
from pixelrepa.training.module import TrainingModule


class ByteCounter(TorchDispatchMode):
    """Sum of tensor input and output bytes over every non-view operator."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for item in tree_flatten((args, kwargs, out))[0]:
                if isinstance(item, torch.Tensor):
                    self.bytes += item.numel() * item.element_size()
        return out


def count(fn: Callable[[], Any]) -> tuple[int, int]:
    flops = count_flops(fn)
    with ByteCounter() as counter:
        fn()
    return flops, counter.bytes


def training_step(preset: str, batch: int) -> Callable[[], None]:
    config = get_preset(preset)
    torch.manual_seed(0)
    module = TrainingModule(config)
    set_attention_impl(module, "reference")
    randomise_zero_layers(module.net, module.head)
    m = config.model
    x = torch.rand(batch, 3, m.input_size, m.input_size) * 2 - 1
    y = torch.randint(m.num_classes, (batch,))
    target = torch.randn(batch, m.num_patches, config.align.encoder.feature_dim)
    draws = draw_randomness(x, y, m.num_classes, m.num_patches, config.objective, config.align)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(x, draws, target)["total"]
        loss.backward()

    return step


def network_forward(preset: str, batch: int) -> Callable[[], None]:
    config = get_preset(preset)
    torch.manual_seed(0)
    net = JiT(config.model).eval()
    set_attention_impl(net, "reference")
    randomise_zero_layers(net)
    m = config.model
    z = torch.randn(batch, 3, m.input_size, m.input_size)
    t, y = torch.full((batch,), 0.5), torch.randint(m.num_classes, (batch,))

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(z, t, y)

    return forward


def split(build: Callable[[str, int], Callable[[], None]], preset: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(per-image, per-step) parts of (FLOPs, bytes), from counts at batch 1 and 2."""
    one, two = count(build(preset, 1)), count(build(preset, 2))
    per_image = tuple(b - a for a, b in zip(one, two))
    return per_image, tuple(a - p for a, p in zip(one, per_image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-preset", default="PixelREPA-B/16")
    parser.add_argument("--sample-preset", default="JiT-B/16")
    parser.add_argument("--train-batch", type=int, default=128, help="per-GPU batch of the recipe")
    parser.add_argument("--sample-batch", type=int, default=256, help="images per sampling forward")
    parser.add_argument("--tflops", type=float, default=989.0, help="dense bf16 TFLOP/s of the accelerator")
    parser.add_argument("--tbps", type=float, default=3.35, help="memory bandwidth, TB/s")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_params = sum(p.numel() for p in TrainingModule(get_preset(args.train_preset)).parameters() if p.requires_grad)
    net_params = sum(p.numel() for p in JiT(get_preset(args.sample_preset).model).parameters())
    figures = [
        (f"training step {args.train_preset} (fwd + bwd, no optimizer)", split(training_step, args.train_preset),
         args.train_batch, 40 * train_params),
        (f"sampling forward {args.sample_preset} (one network image per image)",
         split(network_forward, args.sample_preset), args.sample_batch, 4 * net_params),
    ]
    rows = []
    for label, ((flops_img, bytes_img), (flops_fixed, bytes_fixed)), batch, floor_bytes in figures:
        flops = flops_img * batch + flops_fixed
        traffic = bytes_img * batch + bytes_fixed
        compute_floor = flops / (args.tflops * 1e12)
        rows.append([label, str(batch), f"{flops_img / 1e9:.1f}", f"{flops / 1e12:.2f}", f"{bytes_img / 1e9:.2f}",
                     f"{traffic / 1e9:.1f}", f"{floor_bytes / 1e9:.2f}", f"{flops / traffic:.0f}",
                     f"{compute_floor * 1e3:.1f}", f"{traffic / (args.tbps * 1e12) * 1e3:.1f}",
                     f"{floor_bytes / (args.tbps * 1e12) * 1e3:.2f}", f"{batch / compute_floor:.0f}"])
    print(f"floors at {args.tflops:g} TFLOP/s dense bf16 and {args.tbps:g} TB/s\n")
    print(markdown_table(["figure", "batch", "GFLOP per image", "TFLOP per call", "GB per image (unfused)",
                          "GB per call (unfused)", "GB per call (parameters only)", "FLOP/byte (unfused)",
                          "compute floor ms", "unfused-traffic floor ms", "parameter-traffic floor ms",
                          "img/s at the compute floor"], rows))


if __name__ == "__main__":
    main()
