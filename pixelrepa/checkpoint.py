"""Training checkpoints: save, find, load and resume, and export a sampling model file.

A checkpoint is a folder `OUT/checkpoints/step-00001200/` holding

- `state/`: a `torch.distributed.checkpoint` (DCP) folder with the training state:
  `model` (the TrainingModule's state, keys `net.*` and `head.*`), `optimizer` (keyed by
  parameter name, as `get_optimizer_state_dict` gives it) and `ema1`, `ema2`, ... (the EMA
  parameters; buffers live in `model` only). Every rank writes only what it holds (its
  FSDP2 shards; under DDP the replicated tensors are written once in all) and reads only
  what it needs, so a checkpoint saved by N processes resumes on M (DCP reshards);
- `rng-rank{r}.pt`: every RNG state of rank r (Python, NumPy, torch CPU, CUDA);
- `state.json`: format tag, step, world size, save time, the full config and the
  trainer's own state (`train`: epoch, data position, EMA step, ...).

Checkpoints of format 1 (`model.safetensors` + `optimizer.pt`, before DCP) still load:
`read_legacy` gives their full state, which the trainer broadcasts from rank 0.
Every `.pt` file loads with `torch.load(..., weights_only=True)`.

Write protocol (a crash at any moment never costs the previous checkpoint): rank 0 removes
stale staging folders and creates `checkpoints/.step-N.tmp/`; every rank writes its part of
`state/` (DCP, fsynced) and its `rng-rank{r}.pt`; rank 0 adds `state.json`, checks that all
files are there, fsyncs, renames the folder to `step-N` (an existing `step-N` is first moved
aside and deleted only once the rename has succeeded), fsyncs `checkpoints/`, points
`checkpoints/latest` at it (temporary file + rename) and prunes. The staging name depends on
the step only, so all ranks find it without communicating. Readers ignore every name starting
with a dot; the next save removes what a crashed one left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pixelrepa.config import RunConfig
from pixelrepa.rng import capture_rng_state
from pixelrepa.weights import load_model_file, save_model_file

FORMAT = "pixelrepa-train-checkpoint/2"
LEGACY_FORMAT = "pixelrepa-train-checkpoint/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
SHARDS = "state"
SHARDS_METADATA = f"{SHARDS}/.metadata"
REQUIRED = (STATE, SHARDS_METADATA)
LEGACY_MODEL = "model.safetensors"
LEGACY_OPTIMIZER = "optimizer.pt"
LEGACY_REQUIRED = (STATE, LEGACY_MODEL, LEGACY_OPTIMIZER)
_STEP_NAME = re.compile(r"step-(\d+)")

def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def save_checkpoint(out_dir: str | Path, step: int, *, config: RunConfig, state: dict[str, Any],
                    train_state: dict[str, Any], keep_last: int, keep_every: int | None) -> Path:
    """Write checkpoint `step` under `out_dir/checkpoints/` and return its folder.

    `state`: the DCP state (`model`, `optimizer`, `ema1`, ...: tensors, DTensors and plain
    values); in a process group every rank calls this with its own `state` (a collective).
    On return the checkpoint is complete on every rank. `train_state` (rank 0's) must be
    JSON-serialisable.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    distributed = _distributed()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sync = dist.barrier if distributed else (lambda: None)
    root = Path(out_dir) / CHECKPOINTS
    tmp = _staging_dir(root, step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp.mkdir()
    sync()
    with _single_process_quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / SHARDS, sync_files=True), no_dist=not distributed)
    write_rank_rng(tmp, rank)
    if rank == 0:
        state_text = json.dumps({"format": FORMAT, "step": step, "world_size": world_size, "saved_at": time.time(),
                                 "config": config.to_dict(), "train": train_state}, indent=1)
        _write_file(tmp / STATE, lambda f: f.write(state_text.encode()))
    sync()
    final = root / _folder_name(step)
    if rank == 0:
        finalize_checkpoint(tmp, keep_last=keep_last, keep_every=keep_every)
    sync()
    return final


def write_rank_rng(tmp_dir: str | Path, rank: int) -> Path:
    """This process's RNG state file in the staging folder."""
    state = capture_rng_state()
    return _write_file(Path(tmp_dir) / rng_file(rank), lambda f: torch.save(state, f))


def finalize_checkpoint(tmp_dir: str | Path, *, keep_last: int, keep_every: int | None) -> Path:
    """Rank 0, once every rank has written its files: rename the staging folder to its final
    name, update `latest`, prune; returns the final folder.

    Kept: the `keep_last` highest steps, every step that is a multiple of `keep_every`,
    and the one just written."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    tmp = Path(tmp_dir)
    state = _read_state(tmp / STATE)
    needed = [*_required(tmp), *(rng_file(r) for r in range(state["world_size"]))]
    missing = [name for name in needed if not (tmp / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot finalize {tmp}: missing {', '.join(missing)}")
    for entry in [*tmp.rglob("*"), tmp]:  # DCP fsyncs its data files; this covers metadata and folders
        _fsync(entry)
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
    """What `state.json` and this rank's RNG file say; the tensors are read by `load_state`
    (in place, sharded) or, for format 1, `read_legacy`."""

    path: Path
    step: int
    format: str
    world_size: int
    """The number of processes that saved it."""
    config: RunConfig
    train_state: dict[str, Any]
    rng_state: dict[str, Any] | None
    """This rank's state, for `restore_rng_state`; None when the checkpoint was saved by
    fewer processes than this rank needs."""

    @property
    def legacy(self) -> bool:
        return self.format == LEGACY_FORMAT


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or for a run folder or its `checkpoints/` the one named
    by `latest` if complete, else the highest-step complete one. Complete: state.json and
    the DCP metadata (format 1: model.safetensors and optimizer.pt) exist."""
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
    """The step, config, trainer state and rank `rank`'s RNG state of `find_checkpoint(path)`.

    A file that exists but cannot be read raises ValueError naming it."""
    folder = find_checkpoint(path)
    state = _read_state(folder / STATE)
    rng_path = folder / rng_file(rank)
    if rank < state["world_size"] and not rng_path.is_file():
        raise FileNotFoundError(f"no RNG state for rank {rank}: {rng_path} is missing")
    rng_state = _load_torch(rng_path) if rank < state["world_size"] else None
    return LoadedCheckpoint(folder, state["step"], state["format"], state["world_size"],
                            RunConfig.from_dict(state["config"]), state["train"], rng_state)


def load_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Read a format-2 checkpoint's `state/` into `state` in place (each rank its own shards
    of every tensor, whatever the process count that saved it); a collective in a process
    group. Every key of `state` must be in the checkpoint."""
    _dcp_load(state, Path(folder) / SHARDS, no_dist=not _distributed())


def _dcp_load(state: dict[str, Any], shards: Path, no_dist: bool) -> None:
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=dcp.FileSystemReader(shards), no_dist=no_dist)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, CheckpointException) as err:
        raise ValueError(f"{shards} is not a readable checkpoint state: {err}") from None


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process even where it is told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_state(folder: str | Path, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Full (unsharded) CPU copies of a checkpoint's state in this process alone: the
    top-level entries `keys` (default all) of `model`, `optimizer`, `ema1`, ... For inspection
    and export; resuming uses `load_state`. Format 1 gives the same layout."""
    folder = find_checkpoint(folder)
    if _read_state(folder / STATE)["format"] == LEGACY_FORMAT:
        groups, optimizer = read_legacy(folder)
        state = {"model": {f"{g}.{k}": v for g in ("net", "head") if g in groups for k, v in groups[g].items()},
                 "optimizer": optimizer, **{g: v for g, v in groups.items() if g.startswith("ema")}}
        return {k: v for k, v in state.items() if keys is None or k in keys}
    try:
        metadata = dcp.FileSystemReader(folder / SHARDS).read_metadata()
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{folder / SHARDS_METADATA} is not readable checkpoint metadata: {err}") from None
    state: dict[str, Any] = {}
    for key, path in metadata.planner_data.items():
        if keys is not None and path[0] not in keys:
            continue
        entry = metadata.state_dict_metadata[key]
        value = (torch.empty(entry.size, dtype=entry.properties.dtype)
                 if isinstance(entry, TensorStorageMetadata) else None)  # plain values are read into place
        _set_path(state, path, value)
    _dcp_load(state, folder / SHARDS, no_dist=True)
    return state


def _set_path(tree: dict[str, Any], path: tuple, value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating dicts (and lists for integer keys)."""
    node: Any = tree
    for key, after in zip(path[:-1], path[1:]):
        child_type = list if isinstance(after, int) else dict
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = child_type()
        elif key not in node:
            node[key] = child_type()
        node = node[key]
    if isinstance(node, list):
        while len(node) <= path[-1]:
            node.append(None)
    node[path[-1]] = value


def read_legacy(folder: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """A format-1 checkpoint's model-file groups (`net`, `head`, `ema1`, ...) and full optimizer state."""
    folder = Path(folder)
    _, groups, _ = load_model_file(folder / LEGACY_MODEL)
    return groups, _load_torch(folder / LEGACY_OPTIMIZER)


def backbone_with_ema(checkpoint_path: str | Path, ema: int = 1) -> tuple[RunConfig, dict[str, Tensor], int]:
    """(config, full backbone state with EMA `ema` (1-based) as its parameters, step)."""
    folder = find_checkpoint(checkpoint_path)
    state = _read_state(folder / STATE)
    name = f"ema{ema}"
    emas = sorted(f"ema{k + 1}" for k in range(len(RunConfig.from_dict(state["config"]).ema.decays)))
    if name not in emas:
        raise ValueError(f"{folder} has no EMA {ema} (available: {', '.join(emas) or 'none'})")
    tensors = read_state(folder, ("model", name))
    net = {k[4:]: v for k, v in tensors["model"].items() if k.startswith("net.")}
    unknown = sorted(set(tensors[name]) - set(net))
    if unknown:
        raise ValueError(f"{folder}: EMA {ema} has '{unknown[0]}', which the backbone lacks")
    return RunConfig.from_dict(state["config"]), {**net, **tensors[name]}, state["step"]


def export_sampling_checkpoint(checkpoint_path: str | Path, out_file: str | Path, ema: int = 1) -> Path:
    """Write a model file holding only EMA `ema` (1-based) as a full backbone state
    (EMA parameters + the net's buffers) under group `net`, as `pixelrepa sample` reads."""
    folder = find_checkpoint(checkpoint_path)
    config, net, step = backbone_with_ema(folder, ema)
    provenance = {"source": str(folder.resolve()), "ema": str(ema), "step": str(step)}
    return save_model_file(out_file, config, {"net": net}, provenance)


def _required(folder: Path) -> tuple[str, ...]:
    return LEGACY_REQUIRED if (folder / LEGACY_MODEL).is_file() else REQUIRED


def _missing(folder: Path) -> list[str]:
    return [name for name in _required(folder) if not (folder / name).is_file()]


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
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, LEGACY_FORMAT):
        tag = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{path} is not a pixelrepa training checkpoint (format tag {tag!r}, expected {FORMAT!r})")
    return state


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is not a readable checkpoint file: {err}") from None
