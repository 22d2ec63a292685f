"""Writing, reading and fingerprinting files, shared by every layer: atomic writes (a crash leaves
the old file or the new one, never half of one), JSON-lines logs and content digests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = False) -> None:
    """`write(tmp)` to a temporary name in the same folder, then rename it over `path`.

    `durable`: the file's bytes and the rename are flushed to the disk (fsync) before this
    returns, for records that must survive a power loss, not only a killed process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a new sibling folder, then swap it in for `path` with two renames and delete
    the old folder: `path` ends up holding exactly what `write` wrote (no file of an earlier folder
    stays), and a crash before the swap leaves the old folder as it was."""
    path = Path(os.path.abspath(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), durable)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file such as a run's log.jsonl. A last line without its newline
    that is not JSON (a writer killed mid-line) is left out; any other line that is not JSON is an
    error naming it."""
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path} line {number} is not JSON ({err}); remove or repair that line") from None
    return records


def fsync_path(path: Path) -> None:
    """fsync a file or (for its entries) a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | Path, algorithm: str = "sha256", block: int = 1 << 24) -> str:
    """Hex digest of a file's bytes, read in blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where pixelrepa caches converted weights and features: `$PIXELREPA_CACHE`, else `~/.cache/pixelrepa`."""
    return Path(os.environ.get("PIXELREPA_CACHE") or Path.home() / ".cache" / "pixelrepa")


def created() -> dict:
    """When and with which versions a record was written."""
    from datetime import datetime, timezone

    import torch

    from pixelrepa.version import __version__

    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pixelrepa": __version__,
            "torch": torch.__version__}
