"""Resuming past a damaged checkpoint, refusing a run folder with no loadable one, --restart."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.training.trainer import train


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "pack"
    pack_arrays(rng.integers(0, 256, size=(32, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=32), path,
                [str(c) for c in range(10)], source="random")
    return path


def config(pack: Path, out: Path, steps: int):
    return get_preset("JiT-Micro/8").replace(**{
        "data.source": str(pack), "data.num_workers": 0, "train.out_dir": str(out), "train.steps": steps,
        "train.per_device_batch": 8, "optim.global_batch": 8, "train.log_every": 1, "train.ckpt_every": 2,
        "train.sample_every": None, "kernels.compile": "none"})


def logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def shard(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}" / "state" / "__0_0.distcp"


@pytest.fixture
def run(pack, tmp_path) -> Path:
    """A run folder trained 4 steps: checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    train(config(pack, out, 4), progress=False)
    return out


def test_no_loadable_checkpoint_is_refused_until_restart(pack, run):
    for metadata in (run / "checkpoints").glob("step-*/state/.metadata"):
        metadata.unlink()
    log = (run / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"(?s)none can be resumed from:\n  step-00000004: .*state/\.metadata.*\n"
                                         r"  step-00000002: .*--restart"):
        train(config(pack, run, 6), progress=False)
    assert (run / "log.jsonl").read_text() == log
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]

    summary = train(config(pack, run, 2), progress=False, restart=True)
    assert summary.resumed_from is None and logged(run) == [1, 2]
    aside = sorted(p.name for p in run.iterdir() if ".aside-" in p.name)
    assert [name.split(".aside-")[0] for name in aside] == ["checkpoints", "log.jsonl", "tensorboard"]
    old = run / aside[0]
    assert sorted(p.name for p in old.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert (run / aside[1]).read_text() == log


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(pack, run, caplog):
    newest = shard(run, 4)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="pixelrepa.train"):
        summary = train(config(pack, run, 6), progress=False)
    assert summary.resumed_from.name == "step-00000002" and summary.steps == 6
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert "step-00000004" in warning and "truncated" in warning and "resuming from step-00000002" in warning
    assert (run / "checkpoints" / "step-00000004.damaged" / "state" / "__0_0.distcp").is_file()
    assert logged(run) == [1, 2, 3, 4, 5, 6]


def test_a_newest_checkpoint_that_fails_to_load_falls_back(pack, run, caplog):
    """Past the checks (written before checksums, sizes right) but unreadable by DCP."""
    (run / "checkpoints" / "step-00000004" / "checksums.json").unlink()
    data = bytearray(shard(run, 4).read_bytes())
    data[:4] = b"XXXX"  # the first item's zip header
    shard(run, 4).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pixelrepa.train"):
        summary = train(config(pack, run, 6), progress=False)
    assert summary.resumed_from.name == "step-00000002"
    assert any("step-00000004" in r.getMessage() and "not a readable checkpoint state" in r.getMessage()
               for r in caplog.records)
    assert logged(run) == [1, 2, 3, 4, 5, 6]


def test_an_explicit_resume_insists_on_its_checkpoint(pack, run):
    data = bytearray(shard(run, 4).read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard(run, 4).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"step-00000004/state/__0_0\.distcp does not match its sha256"):
        train(config(pack, run, 6), resume=run / "checkpoints" / "step-00000004", progress=False)
    with pytest.raises(ValueError, match="pass only one"):
        train(config(pack, run, 6), resume=run, restart=True, progress=False)
    assert (run / "checkpoints" / "step-00000004").is_dir()
