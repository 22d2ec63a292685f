"""The command line, end to end on tiny inputs."""

from __future__ import annotations

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
