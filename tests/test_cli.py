"""The command line, end to end on tiny inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.weights import load_model_file

FIXTURES = Path(os.environ.get("PIXELREPA_PARITY_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-small"))


def test_info_reports_parameter_counts(capsys):
    assert main(["info", "--preset", "PixelREPA-B/16"]) == 0
    out = capsys.readouterr().out
    assert "131.12M learnable" in out and "131.32M with the fixed sin-cos table" in out
    assert "MaskedTransformerAdapter 24.03M" in out


def test_info_json_and_overrides(capsys):
    assert main(["info", "--preset", "JiT-B/16", "--set", "model.depth=6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["depth"] == 6 and data["model"]["hidden_size"] == 768


def test_bad_input_is_a_clear_error(capsys):
    assert main(["info", "--preset", "JiT-Q/16"]) == 2
    assert "unknown preset 'JiT-Q/16'" in capsys.readouterr().err
    assert main(["info", "--preset", "JiT-B/16", "--set", "model.nope=1"]) == 2
    assert "unknown config field 'model.nope'" in capsys.readouterr().err


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
    args = ["demo", "--out", str(out), "--preset", "PixelREPA-Micro/8", "--images", "64", "--steps", "4",
            "--batch-size", "16", "--per-class", "1", "--sample-steps", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "samples" in printed and str(out / "samples.png") in printed
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("align" in r for r in log)
    config, groups, _ = load_model_file(out / "model.safetensors")
    assert config.align.mode == "pixelrepa" and config.ema.warmup
    assert Image.open(out / "samples.png").size[1] >= 10 * config.model.input_size
