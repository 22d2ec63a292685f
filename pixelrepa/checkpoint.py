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
Reading a checkpoint never runs code from it: every `.pt` file and every plain value in
`state/` loads with `torch.load(..., weights_only=True)`, and `state/.metadata` (a pickle
that DCP itself reads with plain `pickle.load`) through an unpickler that admits only the
classes DCP metadata holds (`SafeFileSystemReader`).

`checksums.json` holds the size and SHA-256 of every file under `state/` and of every
`rng-rank*.pt`: each rank hashes the files it wrote while they are in its page cache, rank 0
merges. Readers check sizes and digests (`check_checkpoint`); checkpoints written before
checksums existed load unchecked.

Write protocol (a crash at any moment never costs the previous checkpoint): rank 0 removes
stale staging folders and creates `checkpoints/.step-N.tmp/`; every rank writes its part of
`state/` (DCP, fsynced), its `rng-rank{r}.pt` and their checksums; rank 0 adds `state.json`
and `checksums.json`, checks that all
files are there, fsyncs, renames the folder to `step-N` (an existing `step-N` is first moved
aside and deleted only once the rename has succeeded), fsyncs `checkpoints/`, points
`checkpoints/latest` at it (temporary file + rename) and prunes. The staging name depends on
the step only, so all ranks find it without communicating. Readers ignore every name starting
with a dot; the next save removes what a crashed one left behind. A save that fails while
writing (a full disk) removes its staging folder and raises `CheckpointWriteError`, naming
the disk's free space and the size a checkpoint needs; a save is refused before writing when
the disk has less free space than that.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
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
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._traverse import set_element

from pixelrepa.config import RunConfig
from pixelrepa.files import file_digest, fsync_path
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
CHECKSUMS = "checksums.json"
CHECKSUM_ALGORITHM = "sha256"
"""Hardware-accelerated (SHA-NI) on current x86 CPUs: about twice blake2b's rate there."""
_STEP_NAME = re.compile(r"step-(\d+)")

def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (or would not fit); its staging folder is removed and
    earlier checkpoints are untouched."""


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
    root = Path(out_dir) / CHECKPOINTS
    tmp = _staging_dir(root, step)
    refusal, needed = None, 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        needed = _needed_bytes(root, state, world_size)
        if shutil.disk_usage(root).free < needed:
            refusal = "not enough free space"
        else:
            tmp.mkdir()
    refusal, needed = _from_rank0((refusal, needed))
    if refusal is not None:
        raise _write_error(errno.ENOSPC, refusal, tmp, needed)
    error: BaseException | None = None
    try:
        with _single_process_quiet():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / SHARDS, sync_files=True),
                     no_dist=not distributed)
        write_rank_rng(tmp, rank)
        write_rank_checksums(tmp, rank)
    except (OSError, RuntimeError, CheckpointException) as err:
        error = err
    failure = _first_failure(error)
    if failure is None and rank == 0:
        try:
            state_text = json.dumps({"format": FORMAT, "step": step, "world_size": world_size,
                                     "saved_at": time.time(), "config": config.to_dict(), "train": train_state},
                                    indent=1)
            _write_file(tmp / STATE, lambda f: f.write(state_text.encode()))
            merge_checksums(tmp)
        except (OSError, RuntimeError) as err:
            failure = (err.errno if isinstance(err, OSError) else None, _one_line(err))
    failure = _from_rank0(failure)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _from_rank0(None)  # the others report the free space once the folder is gone
        raise _write_error(*failure, tmp, needed)
    final = root / _folder_name(step)
    if rank == 0:
        finalize_checkpoint(tmp, keep_last=keep_last, keep_every=keep_every)
    if distributed:
        dist.barrier()
    return final


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (a collective in a process group; also a barrier)."""
    if not _distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _first_failure(error: BaseException | None) -> tuple[int | None, str] | None:
    """(errno, one-line message) of the lowest rank's error, the same on every rank; None if
    no rank failed (a collective in a process group)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    mine = None if error is None else (getattr(error, "errno", None), _one_line(error))
    if not _distributed():
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next((f for f in everyone if f is not None), None)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _write_error(code: int | None, reason: str, tmp: Path, needed: int) -> CheckpointWriteError:
    root = tmp.parent
    free = shutil.disk_usage(root).free if root.is_dir() else 0
    return CheckpointWriteError(code, f"cannot write checkpoint {tmp.name[1:-4]} to {root}: {reason}; that disk has "
                                      f"{_size(free)} free and a checkpoint needs about {_size(needed)}: free space "
                                      "there (or lower train.keep_last, or use another train.out_dir); no partial "
                                      "checkpoint is left and earlier checkpoints are untouched")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _needed_bytes(root: Path, state: dict[str, Any], world_size: int) -> int:
    """The size a checkpoint needs: the newest previous one's, else the tensors' bytes (this
    rank's shards times the process count)."""
    folders = _step_folders(root)
    if folders:
        return sum(f.stat().st_size for f in folders[-1][1].rglob("*") if f.is_file())
    return _tensor_bytes(state) * world_size


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def write_rank_rng(tmp_dir: str | Path, rank: int) -> Path:
    """This process's RNG state file in the staging folder."""
    state = capture_rng_state()
    return _write_file(Path(tmp_dir) / rng_file(rank), lambda f: torch.save(state, f))


def _checksum_part(tmp_dir: Path, rank: int) -> Path:
    return tmp_dir / f".checksums-rank{rank}.json"


def write_rank_checksums(tmp_dir: str | Path, rank: int) -> Path:
    """Sizes and digests of the files rank `rank` wrote in the staging folder (its RNG file and
    its DCP shard files), hashed while they are in this process's page cache."""
    tmp = Path(tmp_dir)
    names = [rng_file(rank), *(f"{SHARDS}/{f.name}" for f in sorted((tmp / SHARDS).glob(f"__{rank}_*")))]
    entries = {name: _file_checksum(tmp / name) for name in names if (tmp / name).is_file()}
    return _write_file(_checksum_part(tmp, rank), lambda f: f.write(json.dumps(entries).encode()))


def merge_checksums(tmp_dir: str | Path) -> Path:
    """Rank 0, once every rank has written its part: `checksums.json` from the ranks' parts,
    hashing what no part covers (the DCP metadata); the parts are removed."""
    tmp = Path(tmp_dir)
    parts = sorted(tmp.glob(".checksums-rank*.json"))
    files: dict[str, Any] = {}
    for part in parts:
        files.update(json.loads(part.read_text()))
    for path in sorted([*(tmp / SHARDS).rglob("*"), *tmp.glob("rng-rank*.pt")]):
        name = path.relative_to(tmp).as_posix()
        if path.is_file() and name not in files:
            files[name] = _file_checksum(path)
    text = json.dumps({"algorithm": CHECKSUM_ALGORITHM, "files": dict(sorted(files.items()))}, indent=1)
    written = _write_file(tmp / CHECKSUMS, lambda f: f.write(text.encode()))
    for part in parts:
        part.unlink()
    return written


def _file_checksum(path: Path) -> list:
    """[size, hex digest] of a file."""
    return [path.stat().st_size, file_digest(path, CHECKSUM_ALGORITHM)]


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
        fsync_path(entry)
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
    fsync_path(root)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    _write_file(pointer, lambda f: f.write(f"{final.name}\n".encode()))
    os.replace(pointer, root / LATEST)
    fsync_path(root)
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


def resume_order(root: str | Path) -> list[Path]:
    """A checkpoints folder's final-named checkpoint folders, complete or not, in the order a
    resume tries them: the one `latest` names, then by decreasing step."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [folder for _, folder in reversed(_step_folders(root))]
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return [named, *(f for f in folders if f != named)] if named in folders else folders


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
            dcp.load(state, storage_reader=SafeFileSystemReader(shards), planner=WeightsOnlyLoadPlanner(),
                     no_dist=no_dist)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, CheckpointException) as err:
        raise ValueError(f"{shards} is not a readable checkpoint state: {err}") from None


_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}
"""What a DCP `.metadata` pickle refers to (besides torch dtypes, layouts and memory formats)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global (a crafted file's `os.system`) is refused."""

    def __init__(self, file: Any, path: Any):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise ValueError(f"{self.path} is not checkpoint metadata: it refers to {module}.{name}, which DCP metadata "
                         "never holds (a crafted file runs code when unpickled); it was not loaded: replace the "
                         "checkpoint with a trusted copy")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file-system reader, reading `.metadata` with `_MetadataUnpickler` (torch's own
    `read_metadata` runs plain `pickle.load`, which runs whatever code the file names)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self.fs.concat_path(self.path, ".metadata" if rank is None else f"__{rank}.metadata")
        with self.fs.create_stream(path, "rb") as file:
            metadata = _MetadataUnpickler(file, path).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not checkpoint metadata (it holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading plain (non-tensor) values with
    `torch.load(weights_only=True)` (torch's own uses weights_only=False, which runs code)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"the value of {fqn} is not weights-only loadable: {_one_line(err)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def read_metadata(folder: str | Path) -> Metadata:
    """A format-2 checkpoint's DCP metadata, read safely; ValueError naming the file if unreadable."""
    path = Path(folder) / SHARDS_METADATA
    try:
        return SafeFileSystemReader(Path(folder) / SHARDS).read_metadata()
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as err:
        raise ValueError(f"{path} is not readable checkpoint metadata: {_one_line(err)}") from None


def check_checkpoint(path: str | Path, rank_files: bool = True) -> Path:
    """`find_checkpoint(path)` once it proved intact, without reading its tensors: state.json
    parses, the metadata reads (safely), every shard file is as long as the metadata says, every
    rank's RNG file exists (`rank_files`), and every file matches `checksums.json` (if written).
    Raises FileNotFoundError or ValueError naming the damaged file."""
    folder = find_checkpoint(path)
    state = _read_state(folder / STATE)
    if rank_files:
        missing = [rng_file(r) for r in range(state["world_size"]) if not (folder / rng_file(r)).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a complete checkpoint (missing {', '.join(missing)})")
    if state["format"] == FORMAT:
        ends: dict[str, int] = {}
        for info in read_metadata(folder).storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            shard = folder / SHARDS / name
            size = shard.stat().st_size if shard.is_file() else None
            if size is None or size < end:
                raise ValueError(f"{shard} is {'missing' if size is None else f'truncated ({size} of {end} bytes)'}")
    verify_checksums(folder)
    return folder


def verify_checksums(folder: str | Path) -> None:
    """Check every file listed in the checkpoint's `checksums.json` (sizes first, then digests);
    ValueError naming the first file that differs. Checkpoints without the file pass."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return
    try:
        recorded = json.loads(listing.read_text())
        algorithm, files = recorded["algorithm"], dict(recorded["files"])
        hashlib.new(algorithm)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{listing} is not a readable checksum list: {_one_line(err)}") from None
    for name, (size, _) in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (listed in {listing})")
        if path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, {size} when saved (truncated or overwritten)")
    for name, (_, digest) in files.items():
        if file_digest(folder / name, algorithm) != digest:
            raise ValueError(f"{folder / name} does not match its {algorithm} in {listing}: the file changed "
                             "after it was saved (a damaged disk or copy)")


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
    folder = check_checkpoint(folder, rank_files=False)
    if _read_state(folder / STATE)["format"] == LEGACY_FORMAT:
        groups, optimizer = read_legacy(folder)
        state = {"model": {f"{g}.{k}": v for g in ("net", "head") if g in groups for k, v in groups[g].items()},
                 "optimizer": optimizer, **{g: v for g, v in groups.items() if g.startswith("ema")}}
        return {k: v for k, v in state.items() if keys is None or k in keys}
    metadata = read_metadata(folder)
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
