"""Training checkpoints: round trip, pruning, `latest`, crash safety, export, RNG files, format 1,
no code run by a crafted checkpoint, checksums, a full disk."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrepa.config import get_preset
from pixelrepa.models.jit import JiT
from pixelrepa import checkpoint as ckpt
from pixelrepa.checkpoint import (
    CheckpointWriteError,
    backbone_with_ema,
    check_checkpoint,
    export_sampling_checkpoint,
    finalize_checkpoint,
    find_checkpoint,
    load_checkpoint,
    load_state,
    read_state,
    save_checkpoint,
    write_rank_rng,
)
from pixelrepa.rng import capture_rng_state, restore_rng_state
from pixelrepa.training.ema import BackboneEMA
from pixelrepa.training.module import TrainingModule
from pixelrepa.training.parallel import load_sharded_state, sharded_state
from pixelrepa.weights import load_model_file

from helpers import randomize_, write_legacy_checkpoint

TRAIN_STATE = {"epoch": 3, "data": {"index": 17, "images": 1234}, "ema_step": 1,
               "scheduler": {"last_lr": 1e-4}, "elapsed": 12.5}


class Run:
    """A tiny PixelREPA model one AdamW step and one EMA update into training."""

    def __init__(self, seed: int = 0, train: bool = True):
        torch.manual_seed(seed)
        self.config = get_preset("PixelREPA-Micro/8")
        self.module = randomize_(TrainingModule(self.config), seed=seed)
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=1e-3)
        self.ema = BackboneEMA(self.module.net, self.config.ema)
        if train:
            sum(p.square().sum() for p in self.module.parameters()).backward()
            self.optimizer.step()
            self.ema.update(self.module.net)
            self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict:
        """The checkpoint state, as the trainer passes it."""
        return {**sharded_state(self.module, self.optimizer),
                **{f"ema{k + 1}": self.ema.state_dict(k) for k in range(len(self.ema.shadows))}}

    def save(self, out: Path, step: int, keep_last: int = 10, keep_every: int | None = None,
             train_state: dict | None = None) -> Path:
        return save_checkpoint(out, step, config=self.config, state=self.state(),
                               train_state=TRAIN_STATE if train_state is None else train_state,
                               keep_last=keep_last, keep_every=keep_every)


@pytest.fixture(scope="module")
def run() -> Run:
    return Run()


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(4).tolist()


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def assert_same_training_state(fresh: Run, run: Run) -> None:
    assert_states_equal(fresh.module.state_dict(), run.module.state_dict())
    for k in range(2):
        assert_states_equal(fresh.ema.state_dict(k), run.ema.state_dict(k))
    for mine, theirs in zip(fresh.optimizer.state.values(), run.optimizer.state.values()):
        assert_states_equal(mine, theirs)
    assert fresh.optimizer.state_dict()["param_groups"] == run.optimizer.state_dict()["param_groups"]


def test_round_trip(run, tmp_path):
    random.gauss(0, 1)  # leave cached Gaussians in Python's and NumPy's generators
    np.random.standard_normal()
    folder = run.save(tmp_path, 1200)
    expected = draws()
    assert folder == tmp_path / "checkpoints" / "step-00001200"
    assert sorted(p.name for p in folder.iterdir()) == ["checksums.json", "rng-rank0.pt", "state", "state.json"]
    assert sorted(p.name for p in (folder / "state").iterdir()) == [".metadata", "__0_0.distcp"]

    loaded = load_checkpoint(tmp_path)
    assert loaded.path == folder and loaded.step == 1200 and loaded.world_size == 1 and not loaded.legacy
    assert loaded.config == run.config
    assert loaded.train_state == TRAIN_STATE
    restore_rng_state(loaded.rng_state)
    assert draws() == expected

    fresh = Run(seed=1, train=False)  # a new process: fresh optimizer, no state yet
    state = fresh.state()
    load_state(folder, state)
    load_sharded_state(fresh.module, fresh.optimizer, state)
    assert_same_training_state(fresh, run)

    full = read_state(folder)  # one process, no model: whole tensors by name
    assert set(full) == {"model", "optimizer", "ema1", "ema2"}
    assert_states_equal(full["model"], run.module.state_dict())
    assert_states_equal(full["ema2"], run.ema.state_dict(1))
    assert full["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_pruning_keeps_last_and_every(run, tmp_path):
    for step in range(1, 8):
        run.save(tmp_path, step, keep_last=2, keep_every=3)
    assert names(tmp_path) == ["latest", "step-00000003", "step-00000006", "step-00000007"]
    for step in range(8, 10):
        run.save(tmp_path, step, keep_last=1, keep_every=None)
    assert names(tmp_path) == ["latest", "step-00000009"]


def test_latest_pointer(run, tmp_path):
    for step in (10, 20, 30):
        run.save(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-00000030\n"
    assert find_checkpoint(tmp_path) == find_checkpoint(root) == root / "step-00000030"
    (root / "latest").write_text("step-00000020\n")  # e.g. after resuming from 20
    assert find_checkpoint(tmp_path) == root / "step-00000020"
    (root / "latest").write_text("step-00000040\n")  # names a missing folder: highest complete one
    assert find_checkpoint(tmp_path) == root / "step-00000030"
    (root / "step-00000030" / "state" / ".metadata").unlink()  # incomplete: skipped
    assert find_checkpoint(tmp_path) == root / "step-00000020"
    assert find_checkpoint(root / "step-00000010") == root / "step-00000010"
    with pytest.raises(FileNotFoundError, match="state/.metadata"):
        find_checkpoint(root / "step-00000030")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "empty")


def crash_on_folder_rename(monkeypatch):
    original = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(src).is_dir():
            raise OSError("simulated crash")
        return original(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_interrupted_write_keeps_previous(run, tmp_path, monkeypatch):
    run.save(tmp_path, 100)
    with monkeypatch.context() as patch:
        crash_on_folder_rename(patch)
        with pytest.raises(OSError, match="simulated crash"):
            run.save(tmp_path, 200)
    assert names(tmp_path) == [".step-00000200.tmp", "latest", "step-00000100"]
    assert find_checkpoint(tmp_path).name == "step-00000100"
    assert load_checkpoint(tmp_path).step == 100
    run.save(tmp_path, 300)
    assert names(tmp_path) == ["latest", "step-00000100", "step-00000300"]


def test_stale_tmp_folder_ignored_then_removed(run, tmp_path):
    run.save(tmp_path, 100)
    root = tmp_path / "checkpoints"
    stale = run.save(tmp_path / "elsewhere", 900)  # complete except for the rename
    shutil.move(stale, root / ".step-00000900.tmp")
    (root / ".step-00000100.old-1").mkdir()
    (root / ".latest.tmp-1").write_text("step-00000900\n")
    assert find_checkpoint(tmp_path).name == "step-00000100"
    run.save(tmp_path, 200)
    assert names(tmp_path) == ["latest", "step-00000100", "step-00000200"]


def test_resave_same_step(run, tmp_path, monkeypatch):
    run.save(tmp_path, 100, train_state={"epoch": 1})
    run.save(tmp_path, 100, train_state={"epoch": 2})
    assert names(tmp_path) == ["latest", "step-00000100"]
    assert load_checkpoint(tmp_path).train_state == {"epoch": 2}
    with monkeypatch.context() as patch:  # a failed rename puts the old folder back
        crash_on_folder_rename(patch)
        with pytest.raises(OSError, match="simulated crash"):
            run.save(tmp_path, 100, train_state={"epoch": 3})
    assert names(tmp_path) == [".step-00000100.tmp", "latest", "step-00000100"]
    assert load_checkpoint(tmp_path).train_state == {"epoch": 2}


def test_corrupt_files_raise_naming_the_file(run, tmp_path):
    run.save(tmp_path, 100)
    newest = run.save(tmp_path, 200)
    shards = newest / "state" / "__0_0.distcp"
    shards.write_bytes(shards.read_bytes()[: shards.stat().st_size // 2])
    assert find_checkpoint(tmp_path) == newest  # completeness is by files present
    with pytest.raises(ValueError, match="state"):
        read_state(newest)
    assert read_state(tmp_path / "checkpoints" / "step-00000100", ("ema1",))["ema1"].keys() == \
        run.ema.state_dict(0).keys()
    newest = run.save(tmp_path, 300)
    (newest / "rng-rank0.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="rng-rank0.pt"):
        load_checkpoint(newest)
    (newest / "state.json").write_text("{")
    with pytest.raises(ValueError, match="state.json"):
        load_checkpoint(newest)


def test_export_keeps_only_the_ema_backbone(run, tmp_path):
    folder = run.save(tmp_path, 100)
    out = export_sampling_checkpoint(tmp_path, tmp_path / "ema2.safetensors", ema=2)
    config, groups, metadata = load_model_file(out)
    assert config == run.config and set(groups) == {"net"}
    net = JiT(config.model)
    net.load_state_dict(groups["net"])  # strict
    assert_states_equal(dict(net.named_parameters()), run.ema.state_dict(1))
    torch.testing.assert_close(net.pos_embed, run.module.net.pos_embed, rtol=0, atol=0)
    assert metadata["provenance.ema"] == "2" and metadata["provenance.step"] == "100"
    assert metadata["provenance.source"] == str(folder.resolve())
    with pytest.raises(ValueError, match="no EMA 3"):
        export_sampling_checkpoint(folder, tmp_path / "bad.safetensors", ema=3)


def test_finalize_waits_for_every_rank_rng_file(run, tmp_path):
    folder = run.save(tmp_path / "one", 50)
    tmp = tmp_path / "checkpoints" / ".step-00000050.tmp"
    tmp.parent.mkdir()
    shutil.copytree(folder, tmp)
    info = json.loads((tmp / "state.json").read_text())
    (tmp / "state.json").write_text(json.dumps({**info, "world_size": 2}))  # as two processes save it
    with pytest.raises(FileNotFoundError, match="rng-rank1.pt"):
        finalize_checkpoint(tmp, keep_last=3, keep_every=None)
    torch.manual_seed(1)  # rank 1 is another process with its own state
    rank1 = capture_rng_state()["torch"]
    write_rank_rng(tmp, 1)
    folder = finalize_checkpoint(tmp, keep_last=3, keep_every=None)
    assert load_checkpoint(folder, rank=1).rng_state["torch"].equal(rank1)
    assert load_checkpoint(folder, rank=2).rng_state is None  # a third process: resharded resume


def test_format_1_checkpoints_still_load(run, tmp_path):
    folder = run.save(tmp_path / "new", 100)
    legacy = write_legacy_checkpoint(folder, tmp_path / "old")
    assert find_checkpoint(tmp_path / "old") == legacy
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.legacy and loaded.step == 100 and loaded.train_state == TRAIN_STATE
    old, new = read_state(legacy), read_state(folder)
    assert old.keys() == new.keys()
    assert_states_equal(old["model"], new["model"])
    assert_states_equal(old["ema1"], new["ema1"])
    export_sampling_checkpoint(legacy, tmp_path / "old.safetensors", ema=2)
    export_sampling_checkpoint(folder, tmp_path / "new.safetensors", ema=2)
    assert_states_equal(load_model_file(tmp_path / "old.safetensors")[1]["net"],
                        load_model_file(tmp_path / "new.safetensors")[1]["net"])


class Payload:
    """Pickles as a call of `os.system` that creates `marker`, as a crafted file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def reading_paths(folder: Path, out: Path) -> dict:
    def load():
        fresh = Run(seed=1, train=False)
        load_checkpoint(folder)
        load_state(folder, fresh.state())

    return {"load_state": load, "read_state": lambda: read_state(folder), "check": lambda: check_checkpoint(folder),
            "backbone_with_ema": lambda: backbone_with_ema(folder),
            "export": lambda: export_sampling_checkpoint(folder, out / "ema.safetensors")}


def test_crafted_metadata_runs_no_code(run, tmp_path):
    folder = run.save(tmp_path, 100)
    marker = tmp_path / "pwned"
    (folder / "state" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "checksums.json").unlink()  # whoever crafts the file can rewrite the list too
    for name, read in reading_paths(folder, tmp_path).items():
        with pytest.raises(ValueError, match=r"\.metadata.*posix\.system") as raised:
            read()
        assert not marker.exists(), name
        assert "not checkpoint metadata" in str(raised.value), name


def test_crafted_plain_value_runs_no_code(run, tmp_path):
    marker = tmp_path / "pwned"
    state = run.state()
    state["model"] = {**state["model"], "evil": Payload(marker)}  # DCP stores plain values as pickles
    folder = save_checkpoint(tmp_path, 100, config=run.config, state=state, train_state=TRAIN_STATE, keep_last=1,
                             keep_every=None)
    assert not marker.exists()
    with pytest.raises(ValueError, match="model.evil is not weights-only loadable"):
        read_state(folder)
    assert not marker.exists()


def test_every_file_loads_weights_only(run, tmp_path):
    """What the module docstring claims: RNG files and every item of the DCP shards (tensors and
    the optimizer's plain values) load with torch.load(weights_only=True)."""
    folder = run.save(tmp_path, 100)
    metadata = ckpt.read_metadata(folder)
    items = list(metadata.storage_data.values())
    assert len(items) > 100
    for item in items:
        with open(folder / "state" / item.relative_path, "rb") as f:
            f.seek(item.offset)
            torch.load(io.BytesIO(f.read(item.length)), weights_only=True)
    torch.load(folder / "rng-rank0.pt", weights_only=True)


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_catch_a_flipped_byte(run, tmp_path):
    folder = run.save(tmp_path, 100)
    listing = json.loads((folder / "checksums.json").read_text())
    assert listing["algorithm"] == "sha256"
    assert set(listing["files"]) == {"rng-rank0.pt", "state/.metadata", "state/__0_0.distcp"}
    shard = folder / "state" / "__0_0.distcp"
    flip_byte(shard)  # inside a tensor: DCP alone would load it silently
    for name, read in reading_paths(folder, tmp_path).items():
        with pytest.raises(ValueError, match=r"__0_0\.distcp does not match its sha256"):
            read() if name != "load_state" else check_checkpoint(folder)
    flip_byte(shard)
    assert check_checkpoint(folder) == folder
    flip_byte(folder / "rng-rank0.pt", at=0.9)
    with pytest.raises(ValueError, match="rng-rank0.pt does not match"):
        check_checkpoint(folder)
    flip_byte(folder / "rng-rank0.pt", at=0.9)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"__0_0\.distcp is truncated"):
        check_checkpoint(folder)
    (folder / "checksums.json").unlink()  # written before checksums existed: the size check still holds
    with pytest.raises(ValueError, match=r"__0_0\.distcp is truncated"):
        check_checkpoint(folder)


def test_checkpoints_without_checksums_still_load(run, tmp_path):
    folder = run.save(tmp_path, 100)
    (folder / "checksums.json").unlink()
    assert check_checkpoint(tmp_path) == folder
    assert_states_equal(read_state(folder)["ema1"], run.ema.state_dict(0))


def fail_with_full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["shards", "rng"])
def test_a_full_disk_removes_the_partial_checkpoint(run, tmp_path, monkeypatch, where):
    previous = run.save(tmp_path, 100)
    size = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
    if where == "shards":
        monkeypatch.setattr(ckpt.dcp.FileSystemWriter, "write_data", fail_with_full_disk)
    else:
        monkeypatch.setattr(ckpt, "_write_file", fail_with_full_disk)
    with pytest.raises(CheckpointWriteError) as raised:
        run.save(tmp_path, 200)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC and "\n" not in message
    assert "No space left on device" in message and str(tmp_path / "checkpoints") in message
    assert "GiB free" in message and f"needs about {size / 2**20:.1f} MiB" in message
    monkeypatch.undo()
    assert names(tmp_path) == ["latest", "step-00000100"]
    assert check_checkpoint(tmp_path) == previous


def test_a_save_that_cannot_fit_is_refused_before_writing(run, tmp_path, monkeypatch):
    run.save(tmp_path, 100)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(CheckpointWriteError, match=r"not enough free space; that disk has 1\.0 MiB free and a "
                                                   r"checkpoint needs about \d"):
        run.save(tmp_path, 200)
    assert names(tmp_path) == ["latest", "step-00000100"]
