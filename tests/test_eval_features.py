"""`pixelrepa eval --features encoder:NAME` and feature extraction split across torchrun ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.data.packed import pack_arrays
from pixelrepa.evaluation.features import build_feature_extractor, identify, rank_slice
from pixelrepa.evaluation.metrics import ImageSource, extract_features, load_reference

LITE0 = "encoder:efficientnet-lite0"


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k:06d}.png")
    return folder


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_encoder_features_are_mean_patch_tokens_and_fd_of_a_set_with_itself_is_zero(tmp_path, capsys):
    rng = np.random.default_rng(0)
    samples = write_pngs(tmp_path / "samples", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    extractor, record = build_feature_extractor(LITE0)
    assert record["id"] == LITE0 and record["pooling"] == "mean of patch tokens"
    assert extractor.grid == (8, 8) and extractor.feature_dim == 112  # 128 px, stage 3 (stride 16)
    direct = extract_features(ImageSource(samples), extractor, 3)
    batch = np.stack([np.asarray(Image.open(p)) for p in sorted(samples.glob("*.png"))])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1
    tokens = extractor.encoder(x, grid=(8, 8))
    np.testing.assert_allclose(direct, tokens.mean(1).numpy(), rtol=1e-4, atol=1e-5)

    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref-stats", str(samples), str(ref), "--features", LITE0, "--keep-features"]) == 0
    stored = load_reference(ref)
    assert stored.meta["feature_network"]["id"] == LITE0
    np.testing.assert_allclose(stored.features, direct, rtol=1e-4, atol=1e-5)

    out = tmp_path / "result.json"
    assert main(["eval", str(samples), "--ref", str(ref), "--features", LITE0, "--metrics", "fid", "kid",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["feature_network"]["id"] == LITE0
    assert "efficientnet-lite0" in result["feature_network"]["network"]
    assert result["feature_network"]["weights_source"].endswith(".safetensors")
    assert result["settings"]["features"] == LITE0
    # 8 samples, 112-d: the covariance is singular, so sqrtm is only accurate to ~sqrt(eps) of its scale
    assert abs(result["metrics"]["fid"]) < 1e-4 * np.trace(stored.sigma)
    # unbiased KID of a set against itself is not 0 (k(x, x) enters only the cross term): only its record here
    assert result["metrics"]["kid"]["subset_size"] == 8


def test_reference_of_another_feature_network_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(1)
    images = write_pngs(tmp_path / "images", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    inception_ref = tmp_path / "inception.npz"
    assert main(["eval", "ref-stats", str(images), str(inception_ref)]) == 0
    assert load_reference(inception_ref).meta["feature_network"]["id"] == "inception"
    capsys.readouterr()

    assert main(["eval", str(images), "--ref", str(inception_ref), "--features", LITE0]) == 2
    err = capsys.readouterr().err
    assert "made with feature network 'inception'" in err and f"uses '{LITE0}'" in err

    lite0_ref = tmp_path / "lite0.npz"
    assert main(["eval", "ref-stats", str(images), str(lite0_ref), "--features", LITE0]) == 0
    capsys.readouterr()
    assert main(["eval", str(images), "--ref", str(lite0_ref)]) == 2
    err = capsys.readouterr().err
    assert f"made with feature network '{LITE0}'" in err and "uses 'inception'" in err


def test_feature_specs_and_weights(tmp_path):
    assert identify() == ("inception", 2048)
    assert identify("encoder:dinov2-b") == ("encoder:dinov2-b", 768)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"not really weights")
    assert identify("encoder:dinov2-b", weights)[0].startswith("encoder:dinov2-b@sha256:")
    with pytest.raises(ValueError, match="unknown encoder preset 'nope'"):
        identify("encoder:nope")
    with pytest.raises(ValueError, match="expected 'inception' or 'encoder:NAME'"):
        identify("clip")
    with pytest.raises(FileNotFoundError, match="encoder weights file not found"):
        identify("encoder:dinov2-b", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="--encoder-weights needs --features encoder:NAME"):
        identify("inception", weights)
    assert [rank_slice(9, r, 2) for r in range(2)] == [(0, 4), (4, 9)]
    assert [rank_slice(1, r, 3) for r in range(3)] == [(0, 0), (0, 0), (0, 1)]


def test_source_slices_read_the_images_of_their_range(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    write_pngs(tmp_path / "pngs", images)
    np.savez_compressed(tmp_path / "images.npz", arr_0=images)
    pack_arrays(images.transpose(0, 3, 1, 2), np.zeros(7), tmp_path / "pack", ["a"])
    for path in (tmp_path / "pngs", tmp_path / "images.npz", tmp_path / "pack"):
        source = ImageSource(path)
        for start, stop in ((0, 3), (3, 7), (5, 5), (2, 6)):
            batches = list(source.part(start, stop).batches(2))
            got = torch.cat(batches).permute(0, 2, 3, 1).numpy() if batches else np.zeros((0, 8, 8, 3), np.uint8)
            np.testing.assert_array_equal(got, images[start:stop], err_msg=f"{path} [{start}, {stop})")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_give_the_features_and_metrics_of_one_process(tmp_path):
    rng = np.random.default_rng(2)
    samples = write_pngs(tmp_path / "samples", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
    real = write_pngs(tmp_path / "real", (rng.random((7, 32, 32, 3)) * 128).astype(np.uint8))
    args = ["--features", LITE0, "--metrics", "fid", "kid", "pr", "--batch-size", "2"]

    one = tmp_path / "one.json"
    assert main(["eval", str(samples), "--ref", str(real), *args, "--out", str(one)]) == 0
    ref_one = tmp_path / "ref-one.npz"
    assert main(["eval", "ref-stats", str(samples), str(ref_one), "--features", LITE0, "--keep-features",
                 "--batch-size", "2"]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = tmp_path / "two.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pixelrepa.cli.main", "eval", str(samples), "--ref", str(real), *args, "--out", str(two)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"format"') == 1  # only rank 0 prints the record
    ref_two = tmp_path / "ref-two.npz"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pixelrepa.cli.main", "eval", "ref-stats", str(samples), str(ref_two), "--features", LITE0,
               "--keep-features", "--batch-size", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    np.testing.assert_allclose(load_reference(ref_two).features, load_reference(ref_one).features,
                               rtol=1e-4, atol=2e-5)  # thread count differs per process: float32 sums reorder
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r2["settings"]["world_size"] == 2 and r1["settings"]["world_size"] == 1
    assert r2["feature_network"]["id"] == r1["feature_network"]["id"] == LITE0
    assert r2["metrics"]["fid"] == pytest.approx(r1["metrics"]["fid"], rel=1e-4)
    assert r2["metrics"]["kid"]["mean"] == pytest.approx(r1["metrics"]["kid"]["mean"], rel=1e-4, abs=1e-8)
    assert r2["metrics"]["pr"] == r1["metrics"]["pr"]
