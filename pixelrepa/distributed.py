"""The processes of a run: joining torchrun's or SLURM's process group, and the few collectives
every layer uses (mean of scalars, an object from rank 0).

`World` says where this process stands (rank, world size, local rank, device); one value of it
is made by `init_distributed` and handed down. `in_process_group(work)` runs `work(world)`
inside the group and leaves it cleanly, also on an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

DEFAULT_MASTER_PORT = "29500"


# ---------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------

@dataclass
class World:
    """This process's place among the processes of a run (one per device)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[01-04,07],gpu2' -> 'node01', 'a,b' -> 'a'."""
    depth = 0
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    # Each bracket group contributes its first entry's first value, zero padding kept.
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist).strip()


def _env_from_slurm(environ: Mapping[str, str]) -> dict[str, str] | None:
    """torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
    a SLURM task's environment; None outside SLURM. An explicit MASTER_ADDR / MASTER_PORT wins;
    otherwise the address is the step's (else the job's) first node and the port 29500.

    One task per device is assumed (`srun --ntasks-per-node=<gpus>`); a script started
    without srun in a multi-task allocation would see SLURM_NTASKS > 1 and wait for
    tasks that never come, so launch through srun (or torchrun, which takes precedence).
    """
    if "SLURM_PROCID" not in environ:
        return None
    nodelist = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if environ.get(k)), None)
    master_addr = environ.get("MASTER_ADDR") or (_first_host(nodelist) if nodelist else "127.0.0.1")
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT,
    }


def init_distributed() -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, failing that, SLURM's (written into the
    environment in torchrun's form). With neither, or a world of one, this is a single
    process and no group is created.

    Backend NCCL with device cuda:LOCAL_RANK (made current) when CUDA is available,
    gloo with the CPU otherwise.
    """
    if "RANK" not in os.environ and (slurm := _env_from_slurm(os.environ)) is not None:
        os.environ.update(slurm)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world_size,
                                    device_id=device)
        else:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(barrier: bool = True) -> None:
    """Barrier, then destroy the group (if any). Destroying without the barrier can abort
    at exit ("terminate called without an active exception"), seen with gloo + FSDP2; after
    an error on this rank pass barrier=False, since the other ranks may never reach it."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed(world: World) -> bool:
    """More than one process, in an initialised group."""
    return world.world_size > 1 and dist.is_initialized()


def reduce_mean(values: Mapping[str, Tensor | float], world: World) -> dict[str, float]:
    """Average scalars over ranks with one all-reduce. Every rank must pass the same keys
    in the same order."""
    if not values:
        return {}
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=world.device).detach().reshape(())
                           for v in values.values()])
    if is_distributed(world):
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= world.world_size
    return dict(zip(values.keys(), stacked.tolist()))


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` (any picklable value) on every rank."""
    if not is_distributed(world):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def in_process_group(work: Callable[[World], T]) -> T:
    """`work(world)` inside torchrun's (or SLURM's) process group, none for a single process; the
    group is left with a barrier on success and without one on an error (the other ranks may
    never reach it)."""
    world = init_distributed()
    try:
        result = work(world)
    except BaseException:
        shutdown_distributed(barrier=False)
        raise
    shutdown_distributed()
    return result
