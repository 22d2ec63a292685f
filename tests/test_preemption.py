"""A stop signal ends a run cleanly and resumably; one process per run folder (runlock.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.training.runlock import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, RunFolderBusy,
                                        StopSignals)
from pixelrepa.training.trainer import train

pytestmark = pytest.mark.slow  # end-to-end: `bash scripts/test-slow.sh`

REPO = Path(__file__).resolve().parents[1]
STEPS = 30


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "pack"
    pack_arrays(rng.integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=64), path,
                [str(c) for c in range(10)], source="random")
    return path


def config_file(pack: Path, out: Path, steps: int = STEPS, procs: int = 1, workers: int = 0) -> Path:
    config = get_preset("JiT-Micro/8").replace(**{
        "data.source": str(pack), "data.num_workers": workers, "train.out_dir": str(out), "train.steps": steps,
        "train.per_device_batch": 8 // procs, "optim.global_batch": 8, "optim.lr": 1e-3, "train.log_every": 1,
        "train.ckpt_every": 1000, "train.sample_every": None,
        "kernels.compile": "none"})  # long runs would compile on the CPU first (a minute)
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


def command(config: Path, procs: int = 1) -> list[str]:
    train_cli = ["-m", "pixelrepa", "train", "--config", str(config), "--no-progress"]
    if procs == 1:
        return [sys.executable, *train_cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *train_cli]


def environment(procs: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1" if procs > 1 else "2", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(REPO)}


def logged_steps(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"total"' in line]


def wait_for_step(process: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(logged_steps(out)) < step:
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.stderr.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"training did not reach step {step}")
        time.sleep(0.05)


def worker_pids(parent: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


@pytest.fixture(scope="module")
def uninterrupted(pack, tmp_path_factory) -> dict[int, list[float]]:
    """Losses of uninterrupted runs, by process count."""
    runs = {}
    for procs in (1, 2):
        out = tmp_path_factory.mktemp(f"whole{procs}") / "run"
        subprocess.run(command(config_file(pack, out, procs=procs), procs), env=environment(procs), check=True,
                       capture_output=True)
        runs[procs] = [r["total"] for r in logged_steps(out)]
        assert len(runs[procs]) == STEPS
    return runs


@pytest.mark.parametrize("procs", [1, 2])
def test_a_stop_signal_checkpoints_and_the_rerun_continues_bit_identically(pack, tmp_path, uninterrupted, procs):
    out = tmp_path / "run"
    config = config_file(pack, out, procs=procs)
    process = subprocess.Popen(command(config, procs), env=environment(procs), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(process, out, random.Random(procs).randint(3, 12))
    # One rank only: the ranks must agree to stop at the same step.
    target = process.pid if procs == 1 else worker_pids(process.pid)[-1]
    os.kill(target, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (PREEMPTED_EXIT_CODE if procs == 1 else 1), stderr
    stopped = len(logged_steps(out))
    assert 3 <= stopped < STEPS
    assert "SIGTERM" in stderr and f"step {stopped}" in stderr
    assert (out / "checkpoints" / f"step-{stopped:08d}").is_dir()

    subprocess.run(command(config, procs), env=environment(procs), check=True, capture_output=True)
    steps = [r["step"] for r in logged_steps(out)]
    assert steps == list(range(1, STEPS + 1))  # nothing redone, nothing skipped
    assert [r["total"] for r in logged_steps(out)] == uninterrupted[procs]


def test_ctrl_c_checkpoints_and_exits_130_saying_how_to_continue(pack, tmp_path):
    out = tmp_path / "run"
    # A terminal's Ctrl-C: SIGINT to the whole process group, the loader's worker included.
    process = subprocess.Popen([*command(config_file(pack, out, steps=100_000, workers=1)), "--requeue"],
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for_step(process, out, 1)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED_EXIT_CODE, stderr
    stopped = len(logged_steps(out))
    assert stopped >= 1 and f"SIGINT at step {stopped}" in stderr
    assert (out / "checkpoints" / f"step-{stopped:08d}").is_dir()
    assert "run the same command again to continue" in stderr
    assert "Traceback" not in stderr and "requeue" not in stderr  # a user's Ctrl-C is not a preemption


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # pytest's default handler, or SIG_IGN in an xdist worker
    with StopSignals(("SIGTERM", "SIGUSR1")) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_exits_130_and_a_preemption_75():
    assert Preempted("SIGINT", 3, None).exit_code == INTERRUPTED_EXIT_CODE == 130
    assert Preempted("SIGINT", 3, None).interrupted
    assert Preempted("SIGTERM", 3, None).exit_code == PREEMPTED_EXIT_CODE
    assert not Preempted("SIGUSR1", 3, None).interrupted


def test_a_second_process_on_a_live_run_folder_is_refused(pack, tmp_path):
    out = tmp_path / "run"
    config = config_file(pack, out, steps=100_000)
    process = subprocess.Popen(command(config), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_step(process, out, 1)
        started = time.perf_counter()
        with pytest.raises(RunFolderBusy, match=rf"pid {process.pid} on host {socket.gethostname()}"):
            train(get_preset("JiT-Micro/8").replace(**{
                "data.source": str(pack), "data.num_workers": 0, "train.out_dir": str(out), "train.steps": 2,
                "train.per_device_batch": 8, "optim.global_batch": 8}), progress=False)
        assert time.perf_counter() - started < 10  # at once, before any data or model is built
        log_before = (out / "log.jsonl").read_text()
        assert log_before  # the live run's log is untouched by the refused one
    finally:
        process.kill()  # kill -9: the lock is left behind by a dead process
        process.wait()
    # The dead process's lock is taken over, and the run starts (no checkpoint was written).
    summary = train(get_preset("JiT-Micro/8").replace(**{
        "data.source": str(pack), "data.num_workers": 0, "train.out_dir": str(out), "train.steps": 2,
        "train.per_device_batch": 8, "optim.global_batch": 8, "train.log_every": 1, "train.sample_every": None}),
        progress=False)
    assert summary.steps == 2
    assert (out / "train.lock").read_text() == ""  # released at the end
