"""What every benchmark shares: the fast and reference paths, timing, FLOP counting, the
measured matmul rate that MFU is taken against, peak memory, Markdown output.

Timing: warm-up calls first, then timed calls that alternate between the variants (so all
see the same background load), each synchronised on GPU. Reported: median and spread
(min-max) in seconds. FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on
the eager reference path (the same function as every variant), never guessed.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from pixelrepa.config import REFERENCE_PATH, RunConfig  # noqa: E402
from pixelrepa.models.layers import FinalLayer, JiTBlock  # noqa: E402


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------

def reference_overrides(device: torch.device) -> dict[str, Any]:
    """REFERENCE_PATH; on the CPU eager (the released code's per-block compile is for GPUs)."""
    return REFERENCE_PATH if device.type == "cuda" else {**REFERENCE_PATH, "kernels.compile": "none"}


def add_kernel_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that change the fast path (the reference path stays REFERENCE_PATH)."""
    parser.add_argument("--attention", choices=["sdpa", "reference"], default=None, help="fast path attention")
    parser.add_argument("--sdpa-backend", choices=["auto", "math", "flash", "efficient", "cudnn"], default="auto",
                        help="restrict scaled_dot_product_attention to one backend")
    parser.add_argument("--compile", choices=["auto", "none", "blocks", "model"], default=None,
                        help="fast path torch.compile (default: kernels.compile = auto)")
    parser.add_argument("--cpu-linear", choices=["onednn", "aten"], default=None, help="fast path CPU linear kernel")
    parser.add_argument("--adamw", choices=["fused", "default"], default=None,
                        help="fast path AdamW: the fused kernel or torch's default (training only)")


def fast_overrides(args: argparse.Namespace) -> dict[str, Any]:
    fused = None if args.adamw is None else args.adamw == "fused"
    chosen = {"kernels.attention": args.attention, "kernels.compile": args.compile,
              "kernels.cpu_linear": args.cpu_linear, "kernels.fused_optimizer": fused}
    return {key: value for key, value in chosen.items() if value is not None}


def sdpa_backend(name: str):
    """A context restricting SDPA to one backend ('auto': torch's choice)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return nullcontext() if name == "auto" else sdpa_kernel(backends[name])


def randomise_zero_layers(*modules: nn.Module | None) -> None:
    """Random weights for the adaLN and output layers that are zero at init (realistic compute)."""
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            if isinstance(sub, (JiTBlock, FinalLayer)):
                nn.init.normal_(sub.ada.weight, std=0.02)
            if isinstance(sub, FinalLayer):
                nn.init.normal_(sub.linear.weight, std=0.02)


# ---------------------------------------------------------------------------
# Device, timing, memory
# ---------------------------------------------------------------------------

def setup(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    return device


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant")


def cpu_model() -> str:
    """The CPU's model name as `lscpu` prints it (from /proc/cpuinfo), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line(device: torch.device) -> str:
    """Device, dtype, library version, threads and load: the context of every figure."""
    if device.type == "cuda":
        name, dtype = torch.cuda.get_device_name(device), "bf16 autocast"
    else:
        name, dtype = cpu_model(), "float32"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"device {device.type} ({name}), {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"cores {os.cpu_count()}, load average {load}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(steps: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step; timed calls alternate between the variants."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class Stats:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, times: list[float]) -> "Stats":
        return cls(statistics.median(times), min(times), max(times))

    def cell(self) -> str:
        return f"{self.median:.4f} ({self.low:.4f}-{self.high:.4f})"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS so far (it only
    grows, so later rows include earlier ones)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


# ---------------------------------------------------------------------------
# FLOPs and the matmul rate
# ---------------------------------------------------------------------------

# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel: same formulas.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (run it eagerly: compiled code hides its ops)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, size: int | None = None, repeats: int = 10) -> tuple[float, str]:
    """The best measured dense matmul rate (FLOP/s) on this device: bf16 on GPU; float32 on
    the CPU, through torch.mm and through oneDNN (the fast path's linear), whichever is faster;
    the fastest of `repeats` calls."""
    from pixelrepa.models.onednn import onednn_available, onednn_linear

    size = size or (8192 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    kernels = {"torch.mm": lambda: a @ b}
    if device.type == "cpu" and onednn_available():
        kernels["oneDNN"] = lambda: onednn_linear(a, b)
    best, best_name = 0.0, ""
    for name, kernel in kernels.items():
        times = time_alternating({name: kernel}, 2, repeats, device)[name]
        rate = 2 * size**3 / min(times)  # the best call: a peak rate, least disturbed by other load
        if rate > best:
            best, best_name = rate, name
    return best, f"{'bf16' if dtype == torch.bfloat16 else 'float32'} {best_name} {size}^3"


def memory_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Measured bandwidth (bytes read + written per second) of an in-place float32 add over
    two large tensors (reads both, writes one: the access pattern of an EMA or AdamW update)."""
    src = torch.empty(megabytes * 2**20 // 4, device=device).normal_()
    dst = torch.zeros_like(src)
    times = time_alternating({"add": lambda: dst.add_(src)}, 2, repeats, device)["add"]
    return 3 * src.numel() * 4 / statistics.median(times)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rate_cells(flops: int | None, seconds: float, peak: float) -> list[str]:
    """Achieved TFLOP/s and MFU (against the measured matmul rate)."""
    if not flops:
        return ["-", "-"]
    achieved = flops / seconds
    return [f"{achieved / 1e12:.3f}", f"{100 * achieved / peak:.1f}%"]


def config_summary(config: RunConfig) -> str:
    k = config.kernels
    return (f"attention={config.kernels.attention} linear={k.cpu_linear} compile={k.compile} "
            f"fused_adamw={k.fused_optimizer}")
