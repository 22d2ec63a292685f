"""`pixelrepa eval sweep`: FID / KID over sampler settings of a tiny model against a tiny reference."""

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
from pixelrepa.evaluation import sweep
from pixelrepa.config import SamplerConfig
from pixelrepa.models.jit import JiT
from pixelrepa.sampling import guidance_scale, time_grid
from pixelrepa.weights import save_model_file

NUM = "12"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model file of a randomised JiT-Micro/8, reference .npz with features of 12 random 32-px images)."""
    root = tmp_path_factory.mktemp("sweep")
    config = get_preset("JiT-Micro/8")
    net = randomize_(JiT(config.model)).eval()
    model = save_model_file(root / "model.safetensors", config, {"net": net.state_dict()})
    rng = np.random.default_rng(3)
    pack_arrays(rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8), np.zeros(12), root / "pack", ["a"])
    ref = root / "ref.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "ref-stats", str(root / "pack"), str(ref), "--keep-features",
                     "--device", "cpu"]) == 0
    return model, ref


def sweep_args(model, ref, out, *extra):
    return ["eval", "sweep", str(model), "--ref", str(ref), "--cfg", "1.0", "2.0", "--steps", "2",
            "--num-images", NUM, "--batch-size", "6", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.slow
def test_sweep_writes_tables_plot_and_best(setup, tmp_path, capsys):
    model, ref = setup
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(sweep_args(model, ref, out, "--metrics", "fid", "kid", "--kid-subsets", "5")) == 0
    printed = capsys.readouterr().out

    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and list(rows[0]) == list(sweep.COLUMNS)
    assert [float(r["cfg"]) for r in rows] == [1.0, 2.0]
    assert all(r["steps"] == "2" and r["num_images"] == NUM and r["ema"] == "" for r in rows)
    assert rows[0]["fid"] != rows[1]["fid"] and rows[0]["kid_mean"] != rows[1]["kid_mean"]
    assert all(float(r["fid"]) > 0 and r["kid_std"] for r in rows)

    record = json.loads((out / "sweep.json").read_text())
    assert record["format"] == sweep.SWEEP_FORMAT and len(record["results"]) == 2
    fids = [r["fid"] for r in record["results"]]
    best = record["best"]
    assert best["fid"] == min(fids) and best["cfg"] == record["results"][int(np.argmin(fids))]["cfg"]
    assert record["settings"]["seed"] == 0 and record["settings"]["num_images"] == 12
    assert all(r["is"] is None and r["is_mean"] is None for r in record["results"])
    assert record["results"][0]["kid"]["subsets"] == 5 and record["classifier"] is None
    assert set(record["weights"]) == {"fid", "kid"}
    assert any("singular" in w for w in record["warnings"])

    md = (out / "sweep.md").read_text()
    assert md.count("\n| ") == 3 and "Best:" in md
    assert f"CFG {best['cfg']:g}" in printed and "best:" in printed
    with Image.open(out / "sweep.png") as image:
        assert image.size[0] > image.size[1] > 100  # two panels side by side
        assert len(image.convert("RGB").getcolors(1 << 16)) > 3


def test_sweep_same_images_for_each_setting(setup, monkeypatch, tmp_path):
    """Every setting samples the same indices and noise; only the sampler settings differ (the library call)."""
    model, ref = setup
    seen = []
    real = sweep.generate

    def recording(net, config, indices, labels_for, batch_size, device, seed=0, guide=None):
        indices = list(indices)
        seen.append((config.sampler.cfg_scale, config.sampler.steps, indices, [labels_for(k) for k in indices], seed))
        return real(net, config, indices, labels_for, batch_size, device, seed, guide)

    monkeypatch.setattr(sweep, "generate", recording)
    # A training run folder: each EMA resolves to its own file (here: the same weights).
    monkeypatch.setattr(sweep, "resolve_model_path", lambda path, ema=1: model)
    run = tmp_path / "run"
    run.mkdir()
    settings = sweep.SweepSettings(run, tmp_path / "out", num_images=4, ref=ref, metrics=("kid",), emas=(1, 2),
                                   steps=(1,), cfg=(1.5,), seed=9, kid_subsets=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        returned = sweep.run(settings, torch.device("cpu"))
    assert [(c, s) for c, s, *_ in seen] == [(1.5, 1), (1.5, 1)]
    assert all(x[2:] == (list(range(4)), [0, 1, 2, 3], 9) for x in seen)
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert record == json.loads(json.dumps(returned))
    assert [r["ema"] for r in record["results"]] == [1, 2] and record["best"]["ema"] in (1, 2)
    # Same weights for both EMAs: the same images, so the same KID; without FID the best is by KID.
    assert record["results"][0]["kid_mean"] == pytest.approx(record["results"][1]["kid_mean"], rel=1e-6)
    assert all(r["fid"] is None for r in record["results"]) and record["best"]["kid_mean"] is not None
    assert (tmp_path / "out" / "sweep.png").is_file()


def test_sweep_errors(setup, tmp_path, capsys, monkeypatch):
    model, ref = setup
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no classifier weights to be found
    assert main(sweep_args(model, ref, tmp_path / "o", "--ema", "2")) == 2
    err = capsys.readouterr().err
    assert "model file" in err and "--ema 2" in err and "training run" in err
    stats_only = tmp_path / "stats.npz"
    with np.load(ref) as data:
        np.savez(stats_only, mu=data["mu"], sigma=data["sigma"])
    assert main(sweep_args(model, stats_only, tmp_path / "o", "--metrics", "kid")) == 2
    assert "features" in capsys.readouterr().err
    assert main(sweep_args(model, ref, tmp_path / "o", "--metrics", "is")) == 2
    err = capsys.readouterr().err
    assert "Inception Score" in err and "--inception-weights" in err
    assert main(sweep_args(model, ref, tmp_path / "o", "--metrics", "fid", "pr")) == 2
    assert "a sweep computes fid, kid, is, not pr" in capsys.readouterr().err
    assert main(sweep_args(model, ref, tmp_path / "o", "--steps", "2", "0")) == 2
    assert "steps must be >= 1, got [2, 0]" in capsys.readouterr().err
    assert main(sweep_args(tmp_path / "missing", ref, tmp_path / "o")) == 2
    assert "no model file or training run at" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_best_setting():
    rows = [{"fid": None, "kid_mean": 0.2}, {"fid": None, "kid_mean": 0.1}]
    assert sweep.best_setting(rows) is rows[1]


def expected_nfe(method: str, schedule: str, steps: int, cfg: float) -> int:
    """Network evaluations per image, from the grid: Heun evaluates inner times twice; a guided time
    (inside the interval) costs two images (both passes), an unguided one."""
    sampler = SamplerConfig(method=method, schedule=schedule, steps=steps, cfg_scale=cfg)
    grid = time_grid(sampler)
    times = grid[:-1] + (grid[1:-1] if method == "heun" else [])
    return sum(2 if guidance_scale(t, sampler) != 1.0 else 1 for t in times)


def test_sweep_over_methods_schedules_and_guides_counts_evaluations(setup, tmp_path, capsys, monkeypatch):
    model, ref = setup
    # Pixels as features (the first 2048 values of each image): the axes and the counts are under test,
    # not the Inception network, which would cost seconds per setting.
    monkeypatch.setattr(sweep.inception, "load_extractor", lambda device: lambda x: (x.float().flatten(1)[:, :2048],))
    config = get_preset("JiT-Micro/8").replace(**{"model.depth": 2})
    guide = save_model_file(tmp_path / "weak.safetensors", config, {"net": randomize_(JiT(config.model), 5).state_dict()})
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "sweep", str(model), "--ref", str(ref), "--cfg", "2.0", "--steps", "2", "--num-images", "4",
                     "--metrics", "kid", "--kid-subsets", "3", "--out", str(out), "--device", "cpu",
                     "--method", "heun", "dpm2m", "--schedule", "uniform", "edm",
                     "--guide-model", str(guide)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    rows = record["results"]
    assert [(r["method"], r["schedule"], r["guide"]) for r in rows] == [
        (m, s, str(guide)) for m in ("heun", "dpm2m") for s in ("uniform", "edm-7")]
    for r in rows:
        assert r["nfe"] == expected_nfe(r["method"], r["schedule"].split("-")[0], 2, 2.0)
    assert {r["nfe"] for r in rows} == {5, 3}  # Heun 2 steps: 1 + 2 + 2; dpm2m: 1 + 2
    assert rows[0]["kid_mean"] != rows[1]["kid_mean"]
    with open(out / "sweep.csv") as f:
        assert list(next(csv.DictReader(f))) == list(sweep.COLUMNS)
    assert [label for label, _ in sweep._series(rows, "kid_mean", "nfe")] == [
        "heun, uniform", "heun, edm-7", "dpm2m, uniform", "dpm2m, edm-7"]
    assert "evaluations per image" in capsys.readouterr().out
    bad = save_model_file(tmp_path / "bad.safetensors", config.replace(**{"model.num_classes": 3}),
                          {"net": JiT(config.replace(**{"model.num_classes": 3}).model).state_dict()})
    assert main(sweep_args(model, ref, tmp_path / "o", "--guide-model", str(bad))) == 2
    assert "classes 10 vs the guide's 3" in capsys.readouterr().err
