"""Peak host memory per rank while saving and loading a sharded (DCP) training checkpoint.

Two gloo processes hold a PixelREPA-L/16 training state under FSDP2 (parameters, two EMAs
and the two AdamW moments, float32: about 9.6 GB whole, 4.8 GB per rank). Each rank's peak
resident memory is measured across `save_checkpoint` and across `load_state` (the peak is
reset before each with /proc/self/clear_refs), and checked against a per-rank limit that is
below what one rank would need to gather the whole state, as a checkpoint written by rank 0
from full state dicts (format 1) did.

    python benchmarks/checkpoint_memory.py [--preset PixelREPA-L/16] [--limit-gib 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from common import cpu_model


def resident_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(rank: int, port: int, preset: str, out_dir: str, results: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    from pixelrepa.config import get_preset
    from pixelrepa import checkpoint as ckpt
    from pixelrepa.training.ema import BackboneEMA
    from pixelrepa.training.optim import make_optimizer
    from pixelrepa.distributed import init_distributed, shutdown_distributed
    from pixelrepa.training.parallel import build_training_module, load_sharded_state, sharded_state, wrap_for_training

    config = get_preset(preset).replace(**{"train.parallel": "fsdp2", "train.out_dir": out_dir})
    info = init_distributed()
    torch.manual_seed(0)
    model = wrap_for_training(build_training_module(config, info), "fsdp2", info)
    optimizer = make_optimizer(model, config)
    ema = BackboneEMA(model.net, config.ema)

    def state() -> dict:
        return {**sharded_state(model, optimizer), **{f"ema{k + 1}": ema.state_dict(k) for k in range(2)}}

    state()  # creates the AdamW moments
    local = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
                for part in (model.state_dict(), *(ema.state_dict(k) for k in range(2)))
                for t in part.values())
    local += sum(v.to_local().nbytes if hasattr(v, "to_local") else v.nbytes
                 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    record = {"rank": rank, "local_state_gib": local / 2**30, "before_save_gib": resident_gib("VmRSS")}
    reset_peak()
    ckpt.save_checkpoint(out_dir, 1, config=config, state=state(), train_state={"step": 1}, keep_last=1,
                         keep_every=None)
    record["peak_save_gib"] = resident_gib("VmHWM")
    record["before_load_gib"] = resident_gib("VmRSS")
    reset_peak()
    loaded = state()
    ckpt.load_state(ckpt.find_checkpoint(out_dir), loaded)
    load_sharded_state(model, optimizer, loaded)
    record["peak_load_gib"] = resident_gib("VmHWM")
    Path(results, f"rank{rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="PixelREPA-L/16")
    parser.add_argument("--limit-gib", type=float, default=7.0,
                        help="per-rank peak allowed during save and load (default 7 GiB)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "run"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(port, args.preset, str(out), scratch), nprocs=2, join=True)
        records = [json.loads(Path(scratch, f"rank{r}.json").read_text()) for r in range(2)]
        shard_bytes = sum(p.stat().st_size for p in (out / "checkpoints").rglob("*.distcp"))
    whole = sum(r["local_state_gib"] for r in records)
    print(f"machine   {cpu_model()}, 2 gloo processes, FSDP2, torch {torch.__version__}")
    print(f"state     {args.preset}: params + 2 EMAs + 2 AdamW moments, fp32: {whole:.2f} GiB whole "
          f"(what a gathered save needs on one rank), checkpoint files {shard_bytes / 2**30:.2f} GiB")
    failed = False
    for r in records:
        worst = max(r["peak_save_gib"], r["peak_load_gib"])
        failed |= worst > args.limit_gib
        print(f"rank {r['rank']}    holds {r['local_state_gib']:.2f} GiB; resident before save "
              f"{r['before_save_gib']:.2f} GiB, peak during save {r['peak_save_gib']:.2f} GiB; before load "
              f"{r['before_load_gib']:.2f} GiB, peak during load {r['peak_load_gib']:.2f} GiB "
              f"(limit {args.limit_gib:.1f} GiB: {'over' if worst > args.limit_gib else 'within'})")
    if failed:
        raise SystemExit(f"a rank went over {args.limit_gib} GiB")


if __name__ == "__main__":
    main()
