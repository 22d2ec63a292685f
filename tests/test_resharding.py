"""Checkpoints resume on another number of processes (DCP resharding), DDP and FSDP2 on gloo.

Every step's batches and noise draws depend on the step and the micro-batch's slot only
(`pixelrepa.data.loader`, `rng.step_generator`), so 1 and 2 processes train the same run:
losses agree to float32 rounding (the gradient reduction order differs), and a run stopped on
N processes and resumed on M continues it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa import checkpoint as ckpt
from pixelrepa.device import cpp_compiler_found

REPO = Path(__file__).resolve().parents[1]
STEPS, HALF = 6, 3

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # `bash scripts/test-slow.sh`


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "pack"
    pack_arrays(rng.integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=64), path,
                [str(c) for c in range(10)], source="random")
    return path


def run(pack: Path, out: Path, procs: int, parallel: str, steps: int, **overrides) -> subprocess.CompletedProcess:
    config = get_preset("PixelREPA-Micro/8").replace(**{
        "data.source": str(pack), "data.num_workers": 0, "data.hflip": True, "train.out_dir": str(out),
        "train.steps": steps, "train.per_device_batch": 4, "optim.global_batch": 8, "optim.lr": 1e-3,
        "optim.warmup_epochs": 0.5, "train.log_every": 1, "train.ckpt_every": HALF, "train.sample_every": None,
        "train.parallel": parallel, "align.encoder.img_size": 64, **overrides})
    path = out.parent / f"{out.name}-{steps}.json"
    path.write_text(json.dumps(config.to_dict()))
    train = ["-m", "pixelrepa", "train", "--config", str(path), "--no-progress"]
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, *launcher, *train], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out: Path) -> list[float]:
    return [json.loads(line)["total"] for line in (out / "log.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict:
    return ckpt.read_state(out)


def assert_states_close(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_states_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def whole(pack, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: one process, and two under DDP and under FSDP2."""
    outs = {}
    for name, procs, parallel in (("one", 1, "ddp"), ("ddp2", 2, "ddp"), ("fsdp2", 2, "fsdp2")):
        outs[name] = tmp_path_factory.mktemp(name) / "run"
        run(pack, outs[name], procs, parallel, STEPS)
    return outs


def test_one_and_two_processes_train_the_same_run(whole):
    reference = losses(whole["one"])
    assert len(reference) == STEPS
    for name in ("ddp2", "fsdp2"):
        assert losses(whole[name]) == pytest.approx(reference, rel=1e-4), name
        assert_states_close(final_state(whole[name]), final_state(whole["one"]))


@pytest.mark.parametrize("parallel, before, after", [("ddp", 2, 1), ("fsdp2", 2, 1), ("fsdp2", 1, 2)])
def test_a_checkpoint_resumes_on_another_process_count(pack, tmp_path, whole, parallel, before, after):
    out = tmp_path / "run"
    run(pack, out, before, parallel, HALF)
    shards = sorted(p.name for p in (ckpt.find_checkpoint(out) / "state").glob("*.distcp"))
    assert len(shards) == before  # each process wrote its own part
    run(pack, out, after, parallel, STEPS)
    uninterrupted = whole["one" if before == 1 else ("ddp2" if parallel == "ddp" else "fsdp2")]
    assert losses(out)[:HALF] == losses(uninterrupted)[:HALF]  # the same processes: bit-identical
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-4)
    assert_states_close(final_state(out), final_state(uninterrupted))


@pytest.mark.skipif(not cpp_compiler_found(), reason="inductor needs a C++ compiler on the CPU")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_compiled_blocks_in_two_processes_match_eager(pack, tmp_path, whole, parallel):
    """kernels.compile=model becomes one compiled graph per block with several processes (so
    gradient communication overlaps backward); the run equals the eager one to float32 rounding."""
    result = run(pack, tmp_path / "run", 2, parallel, STEPS, **{"kernels.compile": "model"})
    assert "compiling the model" in result.stderr
    eager = whole["ddp2" if parallel == "ddp" else "fsdp2"]
    assert losses(tmp_path / "run") == pytest.approx(losses(eager), rel=1e-4)
    assert_states_close(final_state(tmp_path / "run"), final_state(eager))
