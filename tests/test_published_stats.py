"""The published reference statistics load as they are, here as small synthetic files of their key
layouts: JiT's and PixelREPA's jit_in256_stats.npz (`mu`, `sigma`) and ADM's
VIRTUAL_imagenet256_labeled.npz (`mu`, `sigma`, the sFID `mu_s`, `sigma_s`, and the reference batch
`arr_0`, here 8 images of 16 px instead of 10,000 of 256 px). The Inception network is replaced by a
fixed random projection of the same output shape (~1 s per image on this CPU; tests/test_metrics.py
runs the real one), and FID's 2048-d square root by a spy (~30 s)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.evaluation import inception, metrics
from pixelrepa.evaluation.live import LiveEvaluator
from pixelrepa.evaluation.metrics import load_reference

DIM, SPATIAL_DIM = 2048, 2023  # Inception pool features; ADM's sFID features (mixed_6/conv, 7 x 17 x 17)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The two published layouts, 8 sample PNGs, and the ADM reference batch also as a PNG folder."""
    root = tmp_path_factory.mktemp("published")
    rng = np.random.default_rng(0)
    jit = root / "jit_in256_stats.npz"
    np.savez(jit, mu=rng.standard_normal(DIM), sigma=np.diag(rng.random(DIM) + 0.5))
    batch = (rng.random((8, 16, 16, 3)) * 160).astype(np.uint8)
    adm = root / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, arr_0=batch, mu=rng.standard_normal(DIM).astype(np.float32), sigma=np.diag(rng.random(DIM) + 0.5),
             mu_s=np.zeros(SPATIAL_DIM, np.float32), sigma_s=np.eye(SPATIAL_DIM, dtype=np.float32))
    for name, images in (("samples", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)), ("batch", batch)):
        (root / name).mkdir()
        for k, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{k:06d}.png")
    return root, jit, adm


class ProjectedPixels(torch.nn.Module):
    """A stand-in for the Inception network: uint8 (N, 3, H, W) -> ((N, 2048),), a fixed projection
    of the 4 x 4 average-pooled pixels."""

    def __init__(self):
        super().__init__()
        self.projection = torch.randn(48, DIM, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return (torch.tanh(pooled @ self.projection),)


@pytest.fixture(autouse=True)
def small_network(monkeypatch):
    monkeypatch.setattr(inception, "load_extractor", lambda device="cpu": ProjectedPixels().to(device))


@pytest.fixture
def fid_spy(monkeypatch):
    """Records the statistics FID is computed from (a 2048-d square root takes ~30 s on this CPU)."""
    calls = []

    def spy(mu1, sigma1, mu2, sigma2, eps=metrics.FID_EPS):
        calls.append((mu1, sigma1, mu2, sigma2))
        return 1.5

    monkeypatch.setattr(metrics, "frechet_distance", spy)
    return calls


def evaluate(root, ref, *extra) -> dict:
    out = root / "result.json"
    assert main(["eval", str(root / "samples"), "--ref", str(ref), "--batch-size", "4", "--device", "cpu",
                 "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_jit_stats_file_is_the_fid_reference(files, fid_spy, capsys):
    root, jit, _ = files
    with np.load(jit) as data:
        assert sorted(data.files) == ["mu", "sigma"]
        mu, sigma = data["mu"], data["sigma"]
    record = evaluate(root, jit, "--metrics", "fid")
    assert record["metrics"]["fid"] == 1.5 and record["reference"]["kind"] == "statistics"
    (mu1, sigma1, mu2, sigma2), = fid_spy
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert mu1.shape == (DIM,) and sigma1.shape == (DIM, DIM)  # the samples' Inception statistics

    assert main(["eval", str(root / "samples"), "--ref", str(jit), "--metrics", "kid"]) == 2
    assert "holds only mu and sigma" in capsys.readouterr().err


def test_adm_file_gives_fid_from_its_statistics_and_kid_pr_from_its_reference_batch(files, fid_spy):
    root, _, adm = files
    reference = load_reference(adm, dim=DIM)
    assert reference.batch_images == 8 and reference.features is None  # arr_0 is not read into memory
    with np.load(adm) as data:
        mu, sigma = data["mu"], data["sigma"]

    record = evaluate(root, adm, "--metrics", "fid", "kid", "pr")
    (_, _, mu2, sigma2), = fid_spy
    np.testing.assert_array_equal(mu2, mu)  # the file's statistics, not those of its 8-image batch
    np.testing.assert_array_equal(sigma2, sigma)
    assert record["reference"]["reference_batch"] is True and record["reference"]["count"] == 8

    from_images = evaluate(root, root / "batch", "--metrics", "kid", "pr")  # the batch as reference images
    assert record["metrics"]["kid"] == from_images["metrics"]["kid"]
    assert record["metrics"]["pr"] == from_images["metrics"]["pr"]
    assert record["metrics"]["pr"]["precision"] < 1.0  # the samples are not the batch: a real comparison

    fid_only = evaluate(root, adm, "--metrics", "fid")
    assert fid_only["reference"]["reference_batch"] is False and fid_only["reference"]["count"] is None


def test_live_evaluation_takes_kid_features_from_the_adm_reference_batch(files, tmp_path):
    root, jit, adm = files
    base = {"eval.every": 1, "eval.images": 4, "eval.batch": 4, "train.out_dir": str(tmp_path)}
    config = get_preset("JiT-Micro/8").replace(**base, **{"eval.ref": str(adm)})
    evaluator = LiveEvaluator(config, device="cpu")
    space = evaluator.spaces[0]
    assert evaluator.kid and space.reference.features.shape == (8, DIM)
    batch = metrics.ImageSource(root / "batch")
    np.testing.assert_array_equal(space.reference.features, metrics.extract_features(batch, space.extractor, 4))
    assert any("reference batch" in note for note in evaluator.notes)

    jit_only = LiveEvaluator(get_preset("JiT-Micro/8").replace(**base, **{"eval.ref": str(jit)}), device="cpu")
    assert not jit_only.kid and jit_only.spaces[0].reference.features is None
