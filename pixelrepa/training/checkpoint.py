"""Training checkpoints: save, find, load and resume, and export a sampling model file.

A checkpoint is a folder `OUT/checkpoints/step-00001200/` holding

- `model.safetensors`: a model file (`pixelrepa.weights`) with groups `net` (the raw
  backbone state), `head` (the alignment head, if any) and `ema1`, `ema2`, ... (the EMA
  parameters; buffers live in `net` only), and the run config in its metadata;
- `optimizer.pt`: the optimiser state dict;
- `rng-rank{r}.pt`: every RNG state of rank r (Python, NumPy, torch CPU, CUDA);
- `state.json`: format tag, step, world size, save time, the full config and the
  trainer's own state (`train`: epoch, data position, EMA step, scheduler, ...).

Every `.pt` file loads with `torch.load(..., weights_only=True)`.

Write protocol (a crash never costs the previous checkpoint): rank 0 removes stale
staging folders and writes model, optimiser and state into `checkpoints/.step-N.tmp/`;
every rank adds its `rng-rank{r}.pt`; rank 0 checks that all files are there, fsyncs,
renames the folder to `step-N` (an existing `step-N` is first moved aside and deleted
only once the rename has succeeded), fsyncs `checkpoints/`, points `checkpoints/latest`
at it (temporary file + rename) and prunes. The staging name depends on the step only,
so all ranks find it without communicating. Readers ignore every name starting with a
dot; the next save removes what a crashed one left behind.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from pixelrepa.config import RunConfig
from pixelrepa.weights import load_model_file, save_model_file

FORMAT = "pixelrepa-train-checkpoint/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
REQUIRED = (STATE, MODEL, OPTIMIZER)
_STEP_NAME = re.compile(r"step-(\d+)")


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


# ---------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA RNG states, in weights-only-loadable types."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices present
    (none without CUDA)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({"bit_generator": npy["bit_generator"],
                         "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def save_checkpoint(out_dir: str | Path, step: int, *, config: RunConfig, groups: dict[str, dict[str, Tensor]],
                    optimizer_state: dict[str, Any], train_state: dict[str, Any], keep_last: int,
                    keep_every: int | None, rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], Any] | None = None) -> Path:
    """Write checkpoint `step` under `out_dir/checkpoints/` and return its folder.

    Single process: one call. Several processes: every rank calls it with
    `barrier=torch.distributed.barrier`; only rank 0's `groups`, `optimizer_state` and
    `train_state` are written (other ranks may pass empty dicts), every rank writes its
    own RNG file. On return the checkpoint is complete on every rank (if rank 0 fails,
    the others wait in the barrier until its timeout). `train_state` must be
    JSON-serialisable.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if world_size > 1 and barrier is None:
        raise ValueError("a multi-process save needs a barrier (e.g. torch.distributed.barrier)")
    sync = barrier or (lambda: None)
    root = Path(out_dir) / CHECKPOINTS
    if rank == 0:
        stage_checkpoint(out_dir, step, config=config, groups=groups, optimizer_state=optimizer_state,
                         train_state=train_state, world_size=world_size)
    sync()
    write_rank_rng(_staging_dir(root, step), rank)
    sync()
    final = root / _folder_name(step)
    if rank == 0:
        finalize_checkpoint(_staging_dir(root, step), keep_last=keep_last, keep_every=keep_every)
    sync()
    return final


def stage_checkpoint(out_dir: str | Path, step: int, *, config: RunConfig, groups: dict[str, dict[str, Tensor]],
                     optimizer_state: dict[str, Any], train_state: dict[str, Any], world_size: int = 1) -> Path:
    """Phase 1 (rank 0): remove stale staging folders, write model, optimiser and state
    into the staging folder `checkpoints/.step-N.tmp/` and return it."""
    state_text = json.dumps({"format": FORMAT, "step": step, "world_size": world_size, "saved_at": time.time(),
                             "config": config.to_dict(), "train": train_state}, indent=1)
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = _staging_dir(root, step)
    tmp.mkdir()
    save_model_file(tmp / MODEL, config, groups, {"checkpoint_step": str(step)})
    _fsync(tmp / MODEL)
    _write_file(tmp / OPTIMIZER, lambda f: torch.save(optimizer_state, f))
    _write_file(tmp / STATE, lambda f: f.write(state_text.encode()))
    return tmp


def write_rank_rng(tmp_dir: str | Path, rank: int) -> Path:
    """Phase 2 (every rank, after rank 0 has staged): this process's RNG state file."""
    state = capture_rng_state()
    return _write_file(Path(tmp_dir) / rng_file(rank), lambda f: torch.save(state, f))


def finalize_checkpoint(tmp_dir: str | Path, *, keep_last: int, keep_every: int | None) -> Path:
    """Phase 3 (rank 0, after every rank's RNG file is written): rename the staging
    folder to its final name, update `latest`, prune; returns the final folder.

    Kept: the `keep_last` highest steps, every step that is a multiple of `keep_every`,
    and the one just written."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    tmp = Path(tmp_dir)
    state = _read_state(tmp / STATE)
    needed = [*REQUIRED, *(rng_file(r) for r in range(state["world_size"]))]
    missing = [name for name in needed if not (tmp / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot finalize {tmp}: missing {', '.join(missing)}")
    _fsync(tmp)
    root = tmp.parent
    final = root / _folder_name(state["step"])
    if final.exists():
        old = _aside_name(final)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    _write_file(pointer, lambda f: f.write(f"{final.name}\n".encode()))
    os.replace(pointer, root / LATEST)
    _fsync(root)
    _prune(root, final, keep_last, keep_every)
    return final


def _folder_name(step: int) -> str:
    return f"step-{step:08d}"


def _staging_dir(root: Path, step: int) -> Path:
    return root / f".{_folder_name(step)}.tmp"


def _aside_name(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old-{os.getpid()}")


def _write_file(path: Path, write: Callable[[Any], Any]) -> Path:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return path


def _fsync(path: Path) -> None:
    """fsync a file or (for its entries) a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(root: Path) -> None:
    """Delete what interrupted saves left: staging and set-aside folders, pointer temporaries."""
    for entry in root.iterdir():
        if entry.name.startswith(".step-") and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name.startswith(f".{LATEST}.tmp-"):
            entry.unlink()


def _prune(root: Path, keep: Path, keep_last: int, keep_every: int | None) -> None:
    folders = _step_folders(root)
    recent = {step for step, _ in folders[-keep_last:]}
    for step, folder in folders:
        if folder == keep or step in recent or (keep_every and step % keep_every == 0):
            continue
        aside = _aside_name(folder)  # renamed first: a half-deleted folder is never visible
        os.replace(folder, aside)
        shutil.rmtree(aside)


# ---------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------

@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    config: RunConfig
    groups: dict[str, dict[str, Tensor]]
    optimizer_state: dict[str, Any]
    train_state: dict[str, Any]
    rng_state: dict[str, Any]
    """This rank's state, for `restore_rng_state`."""


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or for a run folder or its `checkpoints/` the one named
    by `latest` if complete, else the highest-step complete one. Complete: state.json,
    model.safetensors and optimizer.pt exist (contents are checked on loading)."""
    path = Path(path)
    if _STEP_NAME.fullmatch(path.name) or (path / STATE).is_file():
        missing = _missing(path)
        if missing:
            raise FileNotFoundError(f"{path} is not a complete checkpoint (missing {', '.join(missing)})")
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint, run folder or checkpoints folder at {path}")
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_NAME.fullmatch(name) and not _missing(root / name):
            return root / name
    for _, folder in reversed(_step_folders(root)):
        if not _missing(folder):
            return folder
    raise FileNotFoundError(f"no complete checkpoint in {root}")


def load_checkpoint(path: str | Path, rank: int = 0) -> LoadedCheckpoint:
    """Everything needed to resume rank `rank`, from `find_checkpoint(path)`, on the CPU.

    A file that exists but cannot be read raises ValueError naming it."""
    folder = find_checkpoint(path)
    state = _read_state(folder / STATE)
    _, groups, _ = load_model_file(folder / MODEL)
    optimizer_state = _load_torch(folder / OPTIMIZER)
    rng_path = folder / rng_file(rank)
    if not rng_path.is_file():
        raise FileNotFoundError(f"no RNG state for rank {rank}: {rng_path} is missing "
                                f"(checkpoint saved with world size {state['world_size']})")
    return LoadedCheckpoint(folder, state["step"], RunConfig.from_dict(state["config"]), groups,
                            optimizer_state, state["train"], _load_torch(rng_path))


def export_sampling_checkpoint(checkpoint_path: str | Path, out_file: str | Path, ema: int = 1) -> Path:
    """Write a model file holding only EMA `ema` (1-based) as a full backbone state
    (EMA parameters + the net's buffers) under group `net`, as `pixelrepa sample` reads."""
    folder = find_checkpoint(checkpoint_path)
    state = _read_state(folder / STATE)
    config, groups, _ = load_model_file(folder / MODEL)
    name = f"ema{ema}"
    if name not in groups:
        available = sorted(g for g in groups if g.startswith("ema"))
        raise ValueError(f"{folder / MODEL} has no EMA {ema} (available: {', '.join(available) or 'none'})")
    net = groups["net"]
    unknown = sorted(set(groups[name]) - set(net))
    if unknown:
        raise ValueError(f"{folder / MODEL}: EMA {ema} has '{unknown[0]}', which the backbone lacks")
    provenance = {"source": str(folder.resolve()), "ema": str(ema), "step": str(state["step"])}
    return save_model_file(out_file, config, {"net": {**net, **groups[name]}}, provenance)


def _missing(folder: Path) -> list[str]:
    return [name for name in REQUIRED if not (folder / name).is_file()]


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) for final-named checkpoint folders, by increasing step."""
    found = [(int(m.group(1)), entry) for entry in root.iterdir()
             if (m := _STEP_NAME.fullmatch(entry.name)) and entry.is_dir()]
    return sorted(found)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable checkpoint state file: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        tag = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{path} is not a pixelrepa training checkpoint (format tag {tag!r}, expected {FORMAT!r})")
    return state


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is not a readable checkpoint file: {err}") from None
