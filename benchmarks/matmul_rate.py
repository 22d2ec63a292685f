"""The dense matmul rate that MFU is measured against (bf16 on GPU, float32 on the CPU, through
torch.mm and, on the CPU, oneDNN), and the memory bandwidth."""

from __future__ import annotations

import argparse

from common import add_device_flags, device_line, markdown_table, matmul_rate, memory_bandwidth, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_flags(parser)
    parser.add_argument("--size", type=int, default=None, help="square matmul side (default 8192 GPU, 2048 CPU)")
    args = parser.parse_args()
    device = setup(args)
    rate, note = matmul_rate(device, args.size, args.repeats or 5)
    bandwidth = memory_bandwidth(device)
    print(device_line(device) + "\n")
    print(markdown_table(["figure", "measured", "how"], [
        ["dense matmul rate (MFU denominator)", f"{rate / 1e12:.3f} TFLOP/s", note],
        ["memory bandwidth", f"{bandwidth / 1e9:.1f} GB/s", "in-place add_ of two 512 MiB float32 tensors, bytes read + written"],
    ]))


if __name__ == "__main__":
    main()
