"""Reproduction bands: `pixelrepa eval S0 S1 ...` and `pixelrepa eval sweep --seeds ...` report each metric
as mean ± sample std (ddof 1) over sampling seeds."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from helpers import randomize_
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.evaluation import pipeline, sweep
from pixelrepa.evaluation.metrics import ScoreSettings
from pixelrepa.evaluation.sample_folder import MANIFEST_FORMAT, MANIFEST_NAME
from pixelrepa.models.jit import JiT
from pixelrepa.weights import save_model_file

pytestmark = pytest.mark.slow  # end-to-end: `bash scripts/test-slow.sh`


@pytest.fixture(autouse=True)
def no_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no IS classifier weights to be found


def sample_folder(folder, images, seed=None):
    """A `pixelrepa sample`-like folder: images/ and, with a seed, its manifest.json."""
    (folder / "images").mkdir(parents=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / "images" / f"{k:06d}.png")
    if seed is not None:
        settings = {"model_sha256": "0" * 64, "seed": seed, "num_images": len(images), "per_class": 1}
        (folder / MANIFEST_NAME).write_text(json.dumps({"format": MANIFEST_FORMAT, "settings": settings}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three 4-image sample folders of seeds 0, 1, 2, a 6-image one, and a reference with features."""
    root = tmp_path_factory.mktemp("bands")
    rng = np.random.default_rng(5)
    seeds = [sample_folder(root / f"seed{s}", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), s)
             for s in range(3)]
    short = sample_folder(root / "short", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    real = sample_folder(root / "real", (rng.random((10, 16, 16, 3)) * 160).astype(np.uint8))
    ref = root / "ref.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "ref-stats", str(real), str(ref), "--keep-features", "--device", "cpu"]) == 0
    return seeds, short, ref


def evaluate(paths, ref, metrics):
    settings = pipeline.EvalSettings(tuple(paths), ref, metrics, scores=ScoreSettings(kid_subsets=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return json.loads(json.dumps(pipeline.evaluate(settings, torch.device("cpu"))))


@pytest.fixture(scope="module")
def single(folders):
    """The single-source record of the seed-0 folder."""
    seeds, _, ref = folders
    return evaluate(seeds[:1], ref, ("fid", "kid", "pr"))


def test_band_is_numpy_mean_and_sample_std():
    values = [3.0, 4.5, 7.25, 4.0]
    b = sweep.band(values)
    assert b["mean"] == pytest.approx(np.mean(values)) and b["std"] == pytest.approx(np.std(values, ddof=1))
    assert b["n"] == 4 and b["ddof"] == 1
    assert sweep.band([2.0]) == {"mean": 2.0, "std": None, "n": 1, "ddof": 1}
    assert sweep.band([None, float("nan")]) is None and sweep.band([1.0, None, 3.0])["n"] == 2


def test_eval_bands_over_seed_folders(folders, single, tmp_path, capsys):
    seeds, _, ref = folders
    record = evaluate(seeds, ref, ("fid", "kid", "pr"))
    summary = pipeline.format_bands(record["bands"])
    assert [run["seed"] for run in record["runs"]] == [0, 1, 2] and "metrics" not in record
    assert [s["path"] for s in record["samples"]] == [str(p.resolve()) for p in seeds]
    per_seed = {"fid": [r["metrics"]["fid"] for r in record["runs"]],
                "kid": [r["metrics"]["kid"]["mean"] for r in record["runs"]],
                "precision": [r["metrics"]["pr"]["precision"] for r in record["runs"]],
                "recall": [r["metrics"]["pr"]["recall"] for r in record["runs"]]}
    assert set(record["bands"]) == set(per_seed)
    for name, values in per_seed.items():
        band = record["bands"][name]
        assert band["n"] == 3 and band["ddof"] == 1
        assert band["mean"] == pytest.approx(np.mean(values)) and band["std"] == pytest.approx(np.std(values, ddof=1))
    assert len(set(per_seed["fid"])) == 3  # different images, different FIDs
    assert "ddof=1" in record["band_std"]
    assert f"FID {record['bands']['fid']['mean']:.4g} ± " in summary and "(3 seeds, sample std)" in summary

    # Each run is the evaluation of its folder alone, whose record keeps the single-source format.
    assert "runs" not in single and "bands" not in single and single["samples"] == record["samples"][0]
    assert single["metrics"]["fid"] == pytest.approx(record["runs"][0]["metrics"]["fid"], rel=1e-6)
    assert single["metrics"]["kid"]["mean"] == pytest.approx(per_seed["kid"][0], rel=1e-6)
    assert list(single) == ["format", "samples", "reference", "feature_network", "classifier", "weights", "settings",
                            "metrics", "warnings", "timing", "created"]


def test_copies_of_one_folder_have_zero_std(folders, single, tmp_path, capsys):
    seeds, _, ref = folders
    record = evaluate([seeds[0]] * 3, ref, ("kid", "pr"))
    band = record["bands"]["kid"]
    assert band["std"] == 0.0 and band["n"] == 3
    assert band["mean"] == pytest.approx(single["metrics"]["kid"]["mean"], rel=1e-9)
    assert all(r["metrics"]["kid"]["mean"] == single["metrics"]["kid"]["mean"] for r in record["runs"]) and record["bands"]["precision"]["std"] == 0.0
    assert any("more than once" in w for w in record["warnings"]) and "more than once" in capsys.readouterr().err


def test_eval_command_prints_the_bands(folders, tmp_path, capsys):
    seeds, _, ref = folders
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", str(seeds[0]), str(seeds[1]), "--ref", str(ref), "--device", "cpu", "--metrics", "kid",
                     "--kid-subsets", "4", "--out", str(tmp_path / "bands.json")]) == 0
    record = json.loads((tmp_path / "bands.json").read_text())
    assert pipeline.format_bands(record["bands"]) in capsys.readouterr().err and "(2 seeds, sample std)" in \
        pipeline.format_bands(record["bands"])


def test_mixed_counts_and_seeds_refused(folders, capsys):
    seeds, short, ref = folders
    assert main(["eval", str(seeds[0]), str(short), "--ref", str(ref), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "different numbers of images" in err and "--max-images 4" in err
    assert main(["eval", str(seeds[0]), "--ref", str(ref), "--seeds", "0", "1"]) == 2
    assert "--seeds is for `pixelrepa eval sweep`" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Sweeps over several seeds
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_ref(tmp_path_factory):
    """(model file of a randomised JiT-Micro/8, reference .npz with features of 12 random 32-px images)."""
    root = tmp_path_factory.mktemp("sweep-bands")
    config = get_preset("JiT-Micro/8")
    net = randomize_(JiT(config.model)).eval()
    model = save_model_file(root / "model.safetensors", config, {"net": net.state_dict()})
    rng = np.random.default_rng(3)
    pack_arrays(rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8), np.zeros(12), root / "pack", ["a"])
    ref = root / "ref.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "ref-stats", str(root / "pack"), str(ref), "--keep-features", "--device", "cpu"]) == 0
    return model, ref


def sweep_args(model, ref, out, *extra):
    return ["eval", "sweep", str(model), "--ref", str(ref), "--cfg", "1.0", "2.0", "--steps", "2", "--num-images",
            "4", "--batch-size", "4", "--metrics", "kid", "--kid-subsets", "3", "--out", str(out),
            "--device", "cpu", *extra]


def run_sweep(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0


def test_sweep_seeds_equal_single_seed_sweeps(model_and_ref, tmp_path, capsys):
    model, ref = model_and_ref
    run_sweep(sweep_args(model, ref, tmp_path / "both", "--seeds", "0", "1"))
    printed = capsys.readouterr().out
    singles = []
    for seed in (0, 1):
        run_sweep(sweep_args(model, ref, tmp_path / f"seed{seed}", "--seed", str(seed)))
        singles.append(json.loads((tmp_path / f"seed{seed}" / "sweep.json").read_text())["results"])

    record = json.loads((tmp_path / "both" / "sweep.json").read_text())
    assert record["settings"]["seeds"] == [0, 1] and record["settings"]["seed"] is None
    rows = record["results"]
    assert len(rows) == 2 and all(r["seeds"] == [0, 1] and r["n_seeds"] == 2 for r in rows)
    for i, row in enumerate(rows):
        for seed, run in zip((0, 1), row["runs"]):
            assert run["seed"] == seed and run["cfg"] == singles[seed][i]["cfg"] == row["cfg"]
            assert run["kid_mean"] == pytest.approx(singles[seed][i]["kid_mean"], rel=1e-6)
        kids = [run["kid_mean"] for run in row["runs"]]
        assert row["kid_mean"] == pytest.approx(np.mean(kids)) and row["kid_std"] == pytest.approx(np.std(kids, ddof=1))
    assert record["best"]["kid_mean"] == min(r["kid_mean"] for r in rows)  # no FID: the best by mean KID

    out = tmp_path / "both"
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(sweep.BAND_COLUMNS) and len(table) == 2
    assert table[0]["seeds"] == "0 1" and table[0]["n_seeds"] == "2"
    assert float(table[0]["kid_mean"]) == pytest.approx(rows[0]["kid_mean"], rel=1e-5)
    with open(out / "sweep_seeds.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert list(per_seed[0]) == list(sweep.SEED_COLUMNS) and [r["seed"] for r in per_seed] == ["0", "1", "0", "1"]
    md = (out / "sweep.md").read_text()
    assert "ddof=1" in md and "± " in md and "## Per seed" in md and "(2 seeds, sample std)" in md
    assert (out / "sweep.png").is_file() and "mean KID lowest" in printed


def test_interrupted_sweep_keeps_finished_seeds(model_and_ref, tmp_path, monkeypatch):
    model, ref = model_and_ref
    real, calls = sweep.evaluate_setting, []

    def stop_at_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate_setting", stop_at_the_fourth)
    settings = sweep.SweepSettings(model, tmp_path / "out", num_images=4, ref=ref, metrics=("kid",), kid_subsets=3, steps=(2,),
                                   cfg=(1.0, 2.0), batch_size=4, seeds=(0, 1))
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        sweep.run(settings, torch.device("cpu"))
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["seeds"] for r in record["results"]] == [[0, 1], [0]]
    assert record["results"][1]["kid_std"] is None  # one seed: no sample std
    assert record["best"]["cfg"] == 1.0  # the only setting with every seed


def test_seed_and_seeds_refused_together(model_and_ref, tmp_path, capsys):
    model, ref = model_and_ref
    assert main(sweep_args(model, ref, tmp_path / "o", "--seed", "0", "--seeds", "0", "1")) == 2
    assert "--seed and --seeds are mutually exclusive" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
