"""Step times of the fast path against the reference path that mirrors the released code.

fast:      model.attention="sdpa",      sampler.batched_guidance=True
reference: model.attention="reference", sampler.batched_guidance=False

Measured: a PixelREPA training step (training_loss incl. the alignment head, backward,
AdamW) of the tiny presets and of PixelREPA-B/16, and one guided velocity evaluation of
JiT-B/16 (conditional + unconditional pass). Random tensors stand in for the data and for
the frozen encoder's alignment targets. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from typing import Callable, NamedTuple

import torch
from torch import nn

from pixelrepa.align import build_align_head
from pixelrepa.config import RunConfig, get_preset
from pixelrepa.models import create_model
from pixelrepa.models.layers import FinalLayer, JiTBlock
from pixelrepa.objective import draw_randomness, training_loss
from pixelrepa.sampling import GuidedVelocity, guidance_scale

PATHS = {
    "fast": {"model.attention": "sdpa", "sampler.batched_guidance": True},
    "reference": {"model.attention": "reference", "sampler.batched_guidance": False},
}


class Case(NamedTuple):
    group: str
    label: str
    preset: str
    batch: int
    kind: str  # "train" or "sample"
    warmup: int
    repeats: int


CASES = [
    Case("tiny", "train PixelREPA-Micro/8", "PixelREPA-Micro/8", 32, "train", 5, 30),
    Case("tiny", "train PixelREPA-Tiny/4", "PixelREPA-Tiny/4", 32, "train", 5, 30),
    Case("b16", "train PixelREPA-B/16", "PixelREPA-B/16", 2, "train", 2, 5),
    Case("sample", "guided eval JiT-B/16", "JiT-B/16", 2, "sample", 2, 5),
]

RELEASED_NOTE = """\
Note: the released code, patched to run on a 2-core CPU, as reported in the issue (NOT measured
by this script): ~0.076 s per training step of a small configuration (like Micro/8) at batch 32;
3.4-4.0 s per B/16 + MTA training step at batch 2; 1.6-2.0 s per guided B/16 sampling
evaluation at batch 2.
img/s counts output images; a guided evaluation passes 2x that many through the network."""


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def randomise_zero_layers(*modules: nn.Module) -> None:
    """Random weights for the adaLN and output layers that are zero at init (realistic compute)."""
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, (JiTBlock, FinalLayer)):
                nn.init.normal_(sub.ada.weight, std=0.02)
            if isinstance(sub, FinalLayer):
                nn.init.normal_(sub.linear.weight, std=0.02)


def train_step(config: RunConfig, batch: int, device: torch.device) -> Callable[[], None]:
    """One PixelREPA step: draws, training_loss (backbone + adapter), backward, AdamW."""
    torch.manual_seed(0)  # same weights and inputs on both paths
    m = config.model
    net = create_model(m).to(device)
    head = build_align_head(m, config.align).to(device)
    randomise_zero_layers(net, head)
    optimizer = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=config.optim.base_lr,
                                  betas=config.optim.betas, weight_decay=config.optim.weight_decay)
    x = torch.rand(batch, m.in_channels, m.input_size, m.input_size, device=device) * 2 - 1
    y = torch.randint(m.num_classes, (batch,), device=device)
    target = torch.randn(batch, m.num_patches, config.align.encoder.feature_dim, device=device)

    def step() -> None:
        draws = draw_randomness(x, y, m.num_classes, m.num_patches, config.objective, config.align)
        with autocast(device):
            losses = training_loss(net, head, x, draws, config.objective, config.align, config.tap_block, target)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    return step


def guided_eval(config: RunConfig, batch: int, device: torch.device) -> Callable[[], None]:
    """One GuidedVelocity call at a t inside the CFG interval (conditional + unconditional)."""
    torch.manual_seed(0)  # same weights and inputs on both paths
    m = config.model
    net = create_model(m).to(device).eval()
    randomise_zero_layers(net)
    labels = torch.randint(m.num_classes, (batch,), device=device)
    z = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=device)
    velocity = GuidedVelocity(net, labels, m.num_classes, config.sampler, config.objective.t_eps)
    t = 0.5
    assert guidance_scale(t, config.sampler) != 1.0, "t must lie inside the guidance interval"

    def step() -> None:
        with torch.no_grad(), autocast(device):
            velocity(z, t)

    return step


def time_paths(steps: dict[str, Callable[[], None]], warmup: int, repeats: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step; timed calls alternate between the paths so that both
    see the same background load."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed iterations per measurement (default: 30 tiny, 5 for B/16 and sampling)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", choices=["tiny", "b16", "sample"], default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'float32'}"
          f"{', bf16 autocast' if device.type == 'cuda' else ''}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")

    columns = f"{'median s':>8} {'min s':>8} {'max s':>8} {'img/s':>8}"
    print(f"\n{'':<24} {'':>5}   {'fast path':<35}   {'reference path':<35}")
    print(f"{'case':<24} {'batch':>5}   {columns}   {columns}   {'ref/fast':>8}")
    for case in CASES:
        if args.only not in (None, case.group):
            continue
        build = train_step if case.kind == "train" else guided_eval
        steps = {name: build(get_preset(case.preset).replace(**overrides), case.batch, device)
                 for name, overrides in PATHS.items()}
        times = time_paths(steps, case.warmup, args.repeats or case.repeats, device)
        del steps  # free this case's models before the next case builds its own
        medians = {name: statistics.median(t) for name, t in times.items()}
        cells = [f"{medians[name]:8.4f} {min(t):8.4f} {max(t):8.4f} {case.batch / medians[name]:8.1f}"
                 for name, t in times.items()]
        ratio = medians["reference"] / medians["fast"]
        print(f"{case.label:<24} {case.batch:>5}   {cells[0]}   {cells[1]}   {ratio:7.2f}x", flush=True)

    print("\n" + RELEASED_NOTE)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
