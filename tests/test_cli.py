"""The command line, end to end on tiny inputs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixelrepa.config import get_preset
from pixelrepa.cli.main import main
from pixelrepa.weights import load_model_file

FIXTURES = Path(os.environ.get("PIXELREPA_PARITY_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-small"))


def test_info_reports_parameter_counts(capsys):
    assert main(["info", "--preset", "PixelREPA-B/16"]) == 0
    out = capsys.readouterr().out
    assert "131.12M learnable" in out and "131.32M with the fixed sin-cos table" in out
    assert "MaskedTransformerAdapter 24.03M" in out


def test_info_reports_irepa_presets_built_on_the_meta_device(capsys):
    assert main(["info", "--preset", "iREPA-B/16"]) == 0
    out = capsys.readouterr().out
    # Backbone as JiT-B/16; the head one 3x3 conv 768 -> 768 (DINOv2-B): 768 * 768 * 9 + 768.
    assert "131.12M learnable" in out and "irepa, tap after block 4, weight 0.5" in out
    assert "head ConvProjector 5.31M" in out and "spatially z-scored (alpha 0.8)" in out
    assert main(["info", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"iREPA-{size}" in listed for size in ("B/16", "L/16", "H/16", "B/32", "Tiny/4", "Micro/8"))


def test_info_marks_presets_nobody_published(capsys):
    assert main(["info", "--list"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "invented" in listed["PixelREPA-G/16"] and "invented" in listed["JiT-G/32"]
    assert listed["PixelREPA-B/16"] == "PixelREPA-B/16" and listed["JiT-H/32"] == "JiT-H/32"
    assert "CPU preset" in listed["PixelREPA-Demo"] and "not published at 512" in listed["PixelREPA-L/32"]
    assert main(["info", "--preset", "PixelREPA-G/16"]) == 0
    assert "provenance    invented" in capsys.readouterr().out
    assert main(["info", "--preset", "PixelREPA-H/16"]) == 0
    assert "provenance    published" in capsys.readouterr().out


def test_info_json_and_overrides(capsys):
    assert main(["info", "--preset", "JiT-B/16", "--set", "model.depth=6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["depth"] == 6 and data["model"]["hidden_size"] == 768


def test_bad_input_is_a_clear_error(capsys):
    assert main(["info", "--preset", "JiT-Q/16"]) == 2
    assert "unknown preset 'JiT-Q/16'" in capsys.readouterr().err
    assert main(["info", "--preset", "JiT-B/16", "--set", "model.nope=1"]) == 2
    assert "unknown config field 'model.nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_pixelrepa_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "pixelrepa", "info", "--preset", "JiT-Micro/8", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["hidden_size"] == 64
    done = subprocess.run([sys.executable, "-m", "pixelrepa", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: pixelrepa ") and "sample" in done.stdout


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="parity fixtures not present")
def test_import_then_sample(tmp_path, capsys):
    source = FIXTURES / "released" / "pixelrepa_checkpoint-last.pth"
    out = tmp_path / "model.safetensors"
    # The stored args name JiT-B/16, which does not fit: refused, nothing written.
    assert main(["import", str(source), str(out)]) == 2
    assert "'pos_embed'" in capsys.readouterr().err and not out.exists()
    assert main(["import", str(source), str(out), "--config", str(FIXTURES / "config.json"), "--ema", "2"]) == 0
    config, groups, metadata = load_model_file(out)
    assert metadata["provenance.weights"] == "ema2" and set(groups) == {"net", "adapter"}
    expected = torch.load(FIXTURES / "released" / "expected.pt", weights_only=True)["x_pred_ema2"]
    forward = torch.load(FIXTURES / "forward.pt", weights_only=True)
    from pixelrepa.models.jit import JiT
    net = JiT(config.model)
    net.load_state_dict(groups["net"])
    with torch.no_grad():
        got = net(forward["z"], forward["t"], forward["y"])
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    # An existing output is not overwritten without --force.
    before = out.read_bytes()
    assert main(["import", str(source), str(out), "--config", str(FIXTURES / "config.json"), "--ema", "1"]) == 2
    assert out.read_bytes() == before
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out), str(grid), "--steps", "2", "--per-class", "2", "--classes", "0", "3"]) == 0
    image = Image.open(grid)
    assert image.size[1] > 2 * config.model.input_size


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("timm")
    from pixelrepa.data.idx import find_idx_dir
    try:
        find_idx_dir("mnist")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from pixelrepa.align.encoders import lite0_weights
    try:
        lite0_weights()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "demo"
    small = ["--set", "train.per_device_batch=16", "--set", "optim.global_batch=16", "--set", "sampler.steps=2",
             "--set", "train.log_every=1", "--set", "train.ckpt_every=2", "--set", "optim.warmup_steps=2"]
    args = ["demo", "--out", str(out), "--images", "64", "--steps", "4", "--per-class", "1", *small]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "samples" in printed and str(out / "samples.png") in printed
    run = out / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"total"' in line]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("align" in r for r in log)
    # The targets were cached beside the demo's pack, once.
    caches = list((out / "data").glob("mnist-64-seed0/targets/*/manifest.json"))
    assert len(caches) == 1 and json.loads(caches[0].read_text())["complete"]
    config, groups, _ = load_model_file(out / "model.safetensors")
    assert config.align.mode == "pixelrepa" and config.ema.warmup and config.model == get_preset("PixelREPA-Demo").model
    # Running it again with more steps resumes the trainer's run where it stopped.
    assert main(["demo", "--out", str(out), "--images", "64", "--steps", "6", "--per-class", "1", *small]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"total"' in line]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert Image.open(out / "samples.png").size[1] >= 10 * config.model.input_size


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-step JiT-Micro/8 run folder and its exported model file, model.safetensors."""
    import numpy as np

    from pixelrepa.data.packed import pack_arrays

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    pack_arrays(rng.integers(0, 256, size=(8, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=8),
                root / "pack", [str(c) for c in range(10)], source="random")
    assert main(["train", *tiny_train_args(root / "pack"), "--out", str(root / "run")]) == 0
    assert main(["export", str(root / "run"), str(root / "model.safetensors")]) == 0
    return root


def tiny_train_args(pack: Path) -> list[str]:
    return ["--preset", "JiT-Micro/8", "--data", str(pack), "--steps", "1", "--no-progress",
            "--set", "train.per_device_batch=8", "--set", "optim.global_batch=8", "--set", "data.num_workers=0",
            "--set", "train.sample_every=none", "--set", "kernels.compile=none"]


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in lines[0]
    return lines[-1]


def test_train_into_a_file_names_it(tiny_run, capsys):
    (tiny_run / "afile").write_text("")
    assert main(["train", *tiny_train_args(tiny_run / "pack"), "--out", str(tiny_run / "afile")]) == 2
    assert error_line(capsys) == (f"pixelrepa train: error: {tiny_run / 'afile'} is a file where a folder is "
                                  "needed: move it away or choose another path")
    assert main(["train", *tiny_train_args(tiny_run / "pack"), "--out", str(tiny_run / "afile" / "run")]) == 2
    assert error_line(capsys).startswith(f"pixelrepa train: error: {tiny_run / 'afile'} is a file, so "
                                         f"{tiny_run / 'afile' / 'run'} cannot be made")


def test_export_force_onto_a_folder_names_it(tiny_run, capsys):
    (tiny_run / "a-folder").mkdir(exist_ok=True)
    assert main(["export", str(tiny_run / "run"), str(tiny_run / "a-folder"), "--force"]) == 2
    assert error_line(capsys) == (f"pixelrepa export: error: {tiny_run / 'a-folder'} is a folder where a file is "
                                  "needed: give a file's path, or move the folder away")
    assert (tiny_run / "a-folder").is_dir() and [p.name for p in tiny_run.glob(".a-folder*")] == []


def test_sample_under_a_file_names_the_file(tiny_run, capsys):
    (tiny_run / "afile").write_text("")
    model = str(tiny_run / "model.safetensors")
    assert main(["sample", model, str(tiny_run / "afile" / "grid.png"), "--steps", "1"]) == 2
    assert error_line(capsys) == (f"pixelrepa sample: error: {tiny_run / 'afile'} is a file where a folder is "
                                  "needed: move it away or choose another path")
    assert main(["sample", model, str(tiny_run / "afile" / "out"), "--num-images", "1", "--steps", "1"]) == 2
    assert error_line(capsys).startswith(f"pixelrepa sample: error: {tiny_run / 'afile'} is a file, so ")


@pytest.mark.parametrize("code, says", [
    (errno.EACCES, "permission denied: give this user access (chmod / chown) or choose another path"),
    (errno.EROFS, "is on a read-only file system: choose a path on a writable one"),
])
def test_a_folder_that_cannot_be_written_is_named(tiny_run, capsys, monkeypatch, code, says):
    # Tests run as root, which may write anywhere: the refusal is simulated.
    out = tiny_run / "locked" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["train", *tiny_train_args(tiny_run / "pack"), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"pixelrepa train: error: {out}") and line.endswith(says)


def test_a_missing_file_is_named(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "gone"))

    monkeypatch.setattr("pixelrepa.cli.info.run", missing)
    assert main(["info", "--preset", "JiT-Micro/8"]) == 2
    assert error_line(capsys) == (f"pixelrepa info: error: {tmp_path / 'gone'} does not exist: check the path, "
                                  "or create its folder first")


def test_ctrl_c_outside_the_training_loop_is_one_line_and_130(monkeypatch, capsys):
    from pixelrepa.cli import info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info", "--list"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("pixelrepa info: interrupted (Ctrl-C)") and "Traceback" not in err
