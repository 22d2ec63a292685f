"""`train.loggers=tensorboard,wandb`: the numbers of log.jsonl, the configuration and the images go to
wandb (offline, in tmp_path), a resumed run continues the same wandb run, and without wandb
installed the run is refused before it starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.extras import MissingExtra
from pixelrepa.training.metrics import WANDB_RUN_ID
from pixelrepa.training.trainer import train

BLOCK = 32768  # the .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's run-ID.wandb file."""
    from wandb.proto import wandb_internal_pb2 as wandb_proto

    data, position, records, pending = path.read_bytes(), 7, [], b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:  # zero padding at the end of a block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first, then middle / last
        if kind in (1, 4):
            records.append(wandb_proto.Record.FromString(pending))
    return records


def history(run_dir: Path) -> dict[int, dict[str, object]]:
    """{step: {key: value}} of the history records of one offline run folder."""
    rows: dict[int, dict[str, object]] = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            items: dict[str, object] = {}
            for item in record.history.item:
                key, *inner = [item.key] if item.key else list(item.nested_key)
                value = json.loads(item.value_json)
                if inner:  # an image: {"path", "_type", ...}
                    items.setdefault(key, {})[inner[0]] = value
                else:
                    items[key] = value
            rows.setdefault(items.pop("_step"), {}).update(items)
    return rows


def logged_config(run_dir: Path) -> dict:
    config = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return config


class StubValidator:
    """Evaluation records of fixed numbers and a small eval.png, without any network."""

    notes: list[str] = []

    def __init__(self, out: Path):
        self.out = out

    def describe(self) -> dict:
        return {}

    def __call__(self, net, step):
        return {"step": step, "images": 2, "fid": 10.0 / step, "seconds": 0.0}

    def plot(self, log_path):
        path = self.out / "eval.png"
        Image.new("RGB", (8, 8), "white").save(path)
        return path


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir" / "wandb"


def config_for(tmp_path: Path, **overrides):
    pack = tmp_path / "pack"
    if not pack.exists():
        rng = np.random.default_rng(0)
        pack_arrays(rng.integers(0, 256, (32, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 32), pack,
                    [str(c) for c in range(10)], source="random")
    changes = {"data.source": str(pack), "data.num_workers": 0, "train.out_dir": str(tmp_path / "run"),
               "train.steps": 4, "train.per_device_batch": 8, "train.log_every": 1, "train.ckpt_every": 2,
               "train.sample_every": 2, "optim.global_batch": 8, "sampler.steps": 2, "eval.every": 2,
               "eval.images": 2, "eval.ref": "read-by-the-stub-validator-only.npz",
               "train.loggers": "tensorboard,wandb", "kernels.compile": "none"}
    return get_preset("JiT-Micro/8").replace(**(changes | overrides))


@pytest.mark.slow  # two short runs, each starting and finishing a wandb run: 14 to 28 s on the 2-core CPU
def test_wandb_gets_the_logged_numbers_config_and_images_and_a_resume_continues_its_run(tmp_path, offline_wandb):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    stub = StubValidator(out)
    train(config_for(tmp_path, **{"train.steps": 2}), progress=False, validator=lambda world: stub)
    run_id = (out / WANDB_RUN_ID).read_text().strip()
    first_dirs = list(offline_wandb.glob(f"offline-run-*-{run_id}"))
    assert len(first_dirs) == 1

    config = config_for(tmp_path)
    train(config, progress=False, validator=lambda world: stub)  # resumes at step 2
    assert (out / WANDB_RUN_ID).read_text().strip() == run_id
    second = [d for d in offline_wandb.glob(f"offline-run-*-{run_id}") if d not in first_dirs]
    assert len(second) == 1 and len(list(offline_wandb.glob("offline-run-*"))) == 2  # no other run

    before, after = history(first_dirs[0]), history(second[0])
    assert sorted(before) == [1, 2] and sorted(after) == [3, 4]  # the resumed session appends steps 3 and 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for entry in log:
        row = (before | after)[entry["step"]]
        if "eval" in entry:
            assert row["eval/fid"] == entry["eval"]["fid"]
        else:
            assert row["loss/total"] == pytest.approx(entry["total"]) and row["train/lr"] == entry["lr"]
    for key in ("samples", "eval/curves"):  # the sample grid and eval.png as images
        assert after[4][key]["_type"] == "image-file" and (second[0] / "files" / after[4][key]["path"]).is_file()
    assert before[2]["samples"]["_type"] == "image-file"
    assert logged_config(second[0])["train"]["steps"] == 4  # the resolved config, as resumed
    assert logged_config(first_dirs[0])["model"] == config.to_dict()["model"]
    assert (out / "tensorboard").is_dir()


def test_wandb_without_the_package_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    config = config_for(tmp_path, **{"eval.every": None})
    with pytest.raises(MissingExtra, match=r"pip install 'pixelrepa\[wandb\]'"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
    assert main(["train", "--preset", "JiT-Micro/8", "--data", str(tmp_path / "pack"), "--out",
                 str(tmp_path / "run"), "--set", "train.loggers=wandb"]) == 2
    assert "train.loggers=wandb needs the `wandb` package" in capsys.readouterr().err
