"""What checksums cost a training checkpoint: a save with and without them, hashing alone, verifying.

One process holds a PixelREPA-L/16 training state (parameters, two EMAs and the two AdamW
moments, float32: about 9.6 GB) and saves it with `save_checkpoint` twice, once as written
(each file hashed with SHA-256 after it is written) and once with the checksum steps
skipped; then times hashing the files alone (`merge_checksums` on the saved folder) and
`verify_checksums` (what a resume, export or `read_state` adds). The files are read back
from the page cache where they still fit there.

    python benchmarks/checkpoint_checksum.py [--preset PixelREPA-L/16] [--out DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="PixelREPA-L/16")
    parser.add_argument("--out", type=Path, help="a folder on the disk to measure (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pixelrepa.config import get_preset
    from pixelrepa import checkpoint as ckpt
    from pixelrepa.training.ema import BackboneEMA
    from pixelrepa.training.module import TrainingModule
    from pixelrepa.training.optim import make_optimizer
    from pixelrepa.training.parallel import sharded_state

    config = get_preset(args.preset)
    torch.manual_seed(0)
    module = TrainingModule(config)
    optimizer = make_optimizer(module, config)
    ema = BackboneEMA(module.net, config.ema)

    def state() -> dict:
        return {**sharded_state(module, optimizer), **{f"ema{k + 1}": ema.state_dict(k) for k in range(2)}}

    gigabytes = ckpt._tensor_bytes(state()) / 1e9  # the first call creates the AdamW moments
    out = Path(tempfile.mkdtemp(prefix="ckpt-checksum-", dir=args.out))

    def save(name: str) -> tuple[float, Path]:
        start = time.perf_counter()
        folder = ckpt.save_checkpoint(out / name, 1, config=config, state=state(), train_state={"step": 1},
                                      keep_last=1, keep_every=None)
        return time.perf_counter() - start, folder

    try:
        hashing_steps = ckpt.write_rank_checksums, ckpt.merge_checksums
        ckpt.write_rank_checksums = ckpt.merge_checksums = lambda *a: None
        plain, _ = save("plain")
        ckpt.write_rank_checksums, ckpt.merge_checksums = hashing_steps
        checked, folder = save("checked")
        (folder / ckpt.CHECKSUMS).unlink()
        start = time.perf_counter()
        ckpt.merge_checksums(folder)
        hashing = time.perf_counter() - start
        start = time.perf_counter()
        ckpt.verify_checksums(folder)
        verify = time.perf_counter() - start
        files = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
    finally:
        shutil.rmtree(out)
    print(f"{args.preset} training state: {gigabytes:.2f} GB of tensors, {files:.2f} GB of files; "
          f"{cpu_model()}; torch {torch.__version__}; {ckpt.CHECKSUM_ALGORITHM}")
    print("| step | seconds | % of the save without checksums |")
    print("|---|---|---|")
    for name, seconds in (("save without checksums", plain), ("save with checksums", checked),
                          ("hashing the files alone", hashing), ("verifying (resume, export)", verify)):
        print(f"| {name} | {seconds:.1f} | {100 * seconds / plain:.0f}% |")
    print(f"hashing rate: {files / hashing:.2f} GB/s; verifying: {files / verify:.2f} GB/s")


if __name__ == "__main__":
    main()
