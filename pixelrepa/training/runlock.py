"""One training process per run folder, and a clean stop on a preemption signal.

`run_folder_lock(out_dir)` holds an exclusive `flock` on OUT/train.lock for the run's lifetime
and writes the holder (pid, host, start time) into it. A second `pixelrepa train` on the same
folder (a requeued job while the old one still runs) is refused at once, naming the holder.
The kernel releases the lock when its process dies (kill -9, OOM) and a shared file system
does so when the node is lost (NFS: when the client's lease expires), so a lock left by a
dead process is simply taken over; the file's stale holder is then logged.

`StopSignals` turns SIGTERM / SIGUSR1 (what SLURM sends before preemption or at the time
limit) into a request the training loop checks after each step: every rank finishes its
step, the run writes a checkpoint and `train` raises `Preempted` (the CLI exits with
`PREEMPTED_EXIT_CODE`). The ranks agree through one tiny all-reduce on the CPU (gloo), so
the check never waits on the accelerator. A Ctrl-C (SIGINT) is the same request, except that
the CLI exits with `INTERRUPTED_EXIT_CODE` and never requeues; a second Ctrl-C aborts at once
(KeyboardInterrupt).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as torch_dist

logger = logging.getLogger("pixelrepa.train")

LOCK = "train.lock"
PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by a preemption signal after its checkpoint (EX_TEMPFAIL: run
the same command again to continue)."""
INTERRUPTED_EXIT_CODE = 130
"""Exit status of a run stopped by Ctrl-C (SIGINT) after its checkpoint (128 + SIGINT, as a shell reports it)."""


class RunFolderBusy(ValueError):
    """Another live process trains into this run folder."""


class Preempted(Exception):
    """The run stopped on a signal after writing the checkpoint of `step`, or `during` a stage
    before training (then `step` and `checkpoint` are None)."""

    def __init__(self, signal_name: str, step: int | None, checkpoint: Path | None, during: str | None = None):
        where = f"while {during}" if during else f"at step {step}; checkpoint {checkpoint}"
        super().__init__(f"stopped by {signal_name} {where}: run the same command again to continue")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    @property
    def interrupted(self) -> bool:
        """Stopped by a user's Ctrl-C (SIGINT), not by a preemption: not to be requeued."""
        return self.signal_name == "SIGINT"

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.interrupted else PREEMPTED_EXIT_CODE


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


@contextmanager
def run_folder_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT/train.lock while the block runs; RunFolderBusy if a live process holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise RunFolderBusy(
                f"{out_dir} is being trained by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('started', '?')}): wait for it or stop it, or train into another folder "
                "(--out)") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.warning("%s: this file system does not support locks (%s); nothing stops a second process "
                           "from training into the same folder", path, err.strerror)
        previous = _holder(path)
        if previous:
            logger.warning("took over %s from pid %s on host %s, which no longer holds it", path,
                           previous.get("pid"), previous.get("host"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: no stale holder is reported
    finally:
        os.close(fd)  # closing releases the lock


class StopSignals:
    """Records SIGTERM / SIGUSR1 (or the given signals) and SIGINT while installed; `requested()`
    says, agreed over all ranks, whether any rank got one. A second SIGINT raises KeyboardInterrupt."""

    def __init__(self, names: tuple[str, ...]):
        self.names = tuple(dict.fromkeys((*names, "SIGINT")))  # last: a rank's Ctrl-C wins the agreement
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.names:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            cpu = torch_dist.get_backend() == "gloo"
            self._group = None if cpu else torch_dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received = name

    def requested(self) -> str | None:
        """The signal's name if any rank received one (a collective under torchrun), else None."""
        if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([0 if self.received is None else 1 + self.names.index(self.received)])
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self._group)
        return None if flag.item() == 0 else self.names[int(flag.item()) - 1]
