"""Reproducible sample generation: per-index determinism, output folders and resume (`sample_folder`),
and the `pixelrepa sample` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.distributed import World
from pixelrepa.evaluation import sample_folder
from pixelrepa.evaluation.sample_folder import SampleResult, SampleSettings, sample_grid, sample_to_folder
from pixelrepa.sampling import class_layout, generate, sample_classes
from pixelrepa.images import read_png
from pixelrepa.models.jit import JiT
from pixelrepa.device import apply_kernels
from pixelrepa.weights import save_model_file

CPU = torch.device("cpu")
STEPS = ["--steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config with 2 sampler steps, randomised JiT-Micro/8, its model file)."""
    config = get_preset("JiT-Micro/8").replace(**{"sampler.steps": 2})
    net = randomize_(JiT(config.model)).eval()
    path = save_model_file(tmp_path_factory.mktemp("model") / "model.safetensors", config, {"net": net.state_dict()})
    apply_kernels(net, net.blocks, config.kernels, CPU, sampling=True)  # as `pixelrepa sample` does
    return config, net, path


def pngs(out: Path, n: int) -> np.ndarray:
    return np.stack([read_png(out / "images" / f"{k:06d}.png") for k in range(n)])


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding of differently composed batches: a few values off by one."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).sum())


def test_images_do_not_depend_on_the_batch_size(tiny):
    config, net, _ = tiny
    layout = class_layout(config.model.num_classes, per_class=3)  # 12 images over classes 0..3
    by_size = {}
    for batch_size in (1, 5, 12):
        batches = list(generate(net, config, range(12), layout, batch_size, CPU, seed=7))
        assert [len(b) for b, _ in batches] == [min(batch_size, 12 - s) for s in range(0, 12, batch_size)]
        by_size[batch_size] = torch.cat([x for _, x in batches]).numpy()
    assert by_size[1].dtype == np.uint8 and by_size[1].shape == (12, 3, 32, 32) and by_size[1].std() > 10
    assert_same_images(by_size[1], by_size[5])
    assert_same_images(by_size[1], by_size[12])
    # An index's image does not depend on which other indices are generated with it.
    (_, alone), = generate(net, config, [9], layout, 4, CPU, seed=7)
    assert_same_images(alone[0].numpy(), by_size[1][9])
    (_, other_seed), = generate(net, config, [9], layout, 4, CPU, seed=8)
    assert not np.array_equal(other_seed[0].numpy(), by_size[1][9])


def sample(path, out, **changes) -> SampleResult:
    """`sample_to_folder` in one process, 2 sampler steps."""
    settings = SampleSettings(path, out, **{"sampler": {"steps": 2}, **changes})
    return sample_to_folder(settings, World(rank=0, world_size=1, local_rank=0, device=CPU))


def test_sample_classes_are_the_first_images_of_a_run(tiny, tmp_path):
    config, net, path = tiny
    grid = sample_classes(net, config, [3, 1], per_class=2, seed=5, device=CPU)
    out = tmp_path / "run"
    result = sample(path, out, classes=(3, 1), per_class=2, seed=5, format="png", grid=tmp_path / "grid.png")
    assert (result.path, result.num_images, result.made, result.classes) == (out, 4, 4, (3, 1))
    assert result.config.sampler.steps == 2
    assert np.array_equal(pngs(out, 4), grid.permute(0, 2, 3, 1).numpy())
    assert (tmp_path / "grid.png").is_file() and not (out / "samples.npz").exists()
    # The grid alone: the same picture.
    quick = sample_grid(SampleSettings(path, tmp_path / "quick.png", classes=(3, 1), per_class=2, seed=5,
                                       sampler={"steps": 2}), CPU)
    assert (quick.path, quick.classes, quick.per_class) == (tmp_path / "quick.png", (3, 1), 2)
    assert (tmp_path / "quick.png").read_bytes() == (tmp_path / "grid.png").read_bytes()


def test_npz_layout_and_manifest(tiny, tmp_path, monkeypatch):
    config, _, path = tiny
    out = tmp_path / "run"
    # A folder holding model.safetensors stands for the model file.
    assert sample(path.parent, out, num_images=12, per_class=5, batch_size=5).num_images == 12
    with np.load(out / "samples.npz") as npz:
        arr, labels = npz["arr_0"], npz["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 32, 32, 3)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert np.array_equal(arr, pngs(out, 12))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(path.resolve())
    assert manifest["settings"]["num_images"] == 12 and manifest["settings"]["sampler"]["steps"] == 2
    assert manifest["settings"]["classes"] == list(range(config.model.num_classes))
    # npz only: the PNGs are scratch, removed once the npz is written; a rerun has nothing to do.
    npz_only = tmp_path / "npz-only"
    changes = dict(num_images=12, per_class=5, batch_size=5, format="npz")
    sample(path, npz_only, **changes)
    assert not (npz_only / "images").exists()
    with np.load(npz_only / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], arr)
    made = count_generated(monkeypatch)
    assert sample(path, npz_only, **changes).made == 0 and made == []
    # A grid asked for afterwards makes just its images (two rows of five) again.
    sample(path, npz_only, **changes, grid=tmp_path / "grid.png")
    assert made == list(range(10))
    assert (tmp_path / "grid.png").is_file() and not (npz_only / "images").exists()


def count_generated(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Record the indices `sample_to_folder` generates; optionally crash after some batches."""
    made: list[int] = []

    def recording(*args, **kwargs):
        for i, (batch, images) in enumerate(generate(*args, **kwargs)):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("interrupted")
            made.extend(batch)
            yield batch, images

    monkeypatch.setattr(sample_folder, "generate", recording)
    return made


def test_resume_makes_only_the_missing_images(tiny, tmp_path, monkeypatch):
    _, _, path = tiny
    changes = dict(num_images=12, batch_size=4, seed=3)
    reference = tmp_path / "reference"
    sample(path, reference, **changes)

    out = tmp_path / "run"
    made = count_generated(monkeypatch, fail_after=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        sample(path, out, **changes)
    assert made == [0, 1, 2, 3] and not (out / "samples.npz").exists()
    (out / "images" / "000002.png").write_bytes(b"\x89PNG truncated")  # a damaged file is made again

    made = count_generated(monkeypatch)
    assert sample(path, out, **changes).made == 9
    assert made == [2, *range(4, 12)]
    with np.load(reference / "samples.npz") as a, np.load(out / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])

    made = count_generated(monkeypatch)
    assert sample(path, out, **changes).made == 0 and made == []


def test_other_settings_are_refused_unless_overwrite(tiny, tmp_path):
    _, _, path = tiny
    out = tmp_path / "run"
    sample(path, out, num_images=3)
    first = pngs(out, 3)
    changed = dict(num_images=3, seed=1, sampler={"steps": 2, "cfg_scale": 2.0})
    with pytest.raises(ValueError, match=r"other settings \(differs in: sampler, seed\).*--overwrite"):
        sample(path, out, **changed)
    assert np.array_equal(pngs(out, 3), first)
    assert sample(path, out, **changed, overwrite=True).config.sampler.cfg_scale == 2.0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 1
    assert not np.array_equal(pngs(out, 3), first)
    # A non-empty folder without a manifest is not written into either.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no readable manifest.json"):
        sample(path, other, num_images=1)


def test_command_line(tiny, tmp_path, capsys):
    """`pixelrepa sample`: the flags reach the settings; a folder, then a grid."""
    _, _, path = tiny
    out = tmp_path / "run"
    assert main(["sample", str(path), str(out), *STEPS, "--cfg", "2.0", "--interval", "0.2", "0.9", "--method",
                 "euler", "--classes", "3", "1", "--per-class", "2", "--num-images", "3", "--seed", "5",
                 "--batch-size", "2", "--format", "npz", "--grid", str(tmp_path / "grid.png")]) == 0
    assert capsys.readouterr().out == (f"{out}: 3 images (3 made now, 0 already there), euler 2 steps, CFG 2.0 on "
                                       "(0.2, 0.9), seed 5\n")
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert (settings["classes"], settings["per_class"], settings["num_images"], settings["seed"]) == ([3, 1], 2, 3, 5)
    assert (tmp_path / "grid.png").is_file() and not (out / "images").exists()
    assert main(["sample", str(path), str(tmp_path / "quick.png"), *STEPS, "--classes", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'quick.png'}: 1 classes x 8, heun 2 steps")


def test_clear_errors(tiny, tmp_path, capsys):
    _, _, path = tiny
    out = str(tmp_path / "run")
    assert main(["sample", str(path), out, "--classes", "3", "10"]) == 2
    assert "class 10 outside [0, 10)" in capsys.readouterr().err
    assert main(["sample", str(path), out, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert main(["sample", str(bad), out]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing.safetensors"), out]) == 2
    assert "no model file or training run at" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), out]) == 2
    assert "pixelrepa export" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_write_the_same_images(tiny, tmp_path):
    _, _, path = tiny
    args = [str(path), *STEPS, "--num-images", "12", "--per-class", "4", "--batch-size", "4", "--seed", "2"]
    assert main(["sample", args[0], str(tmp_path / "one"), *args[1:]]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pixelrepa.cli.main", "sample", args[0], str(tmp_path / "two"), *args[1:]],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 images (12 made now, 0 already there)" in done.stdout
    assert_same_images(pngs(tmp_path / "one", 12), pngs(tmp_path / "two", 12))
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert_same_images(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["labels"], b["labels"])


def test_sample_with_a_guide_model(tiny, tmp_path, capsys):
    """`pixelrepa sample --guide-model`: the guide replaces the unconditional pass (and is part of the
    folder's settings); a guide of other images is refused, naming the mismatch."""
    config, net, path = tiny
    weaker = config.replace(**{"model.depth": 2})
    guide_net = randomize_(JiT(weaker.model), seed=3).eval()
    guide = save_model_file(tmp_path / "guide.safetensors", weaker, {"net": guide_net.state_dict()})
    args = ["sample", str(path), str(tmp_path / "out"), "--classes", "2", "--per-class", "2", "--format", "png",
            "--method", "dpm2m", "--schedule", "shifted", "--shift", "2", *STEPS, "--cfg", "2.5", "--interval", "0", "1"]
    assert main(args + ["--guide-model", str(guide)]) == 0
    guided = pngs(tmp_path / "out", 2)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]
    assert len(manifest["guide_sha256"]) == 64 and manifest["sampler"]["method"] == "dpm2m"
    assert manifest["sampler"]["schedule"] == "shifted" and manifest["sampler"]["shift"] == 2.0
    assert main(args[:2] + [str(tmp_path / "plain")] + args[3:]) == 0
    assert np.abs(guided.astype(int) - pngs(tmp_path / "plain", 2)).max() > 0
    # The same images through the library, with the guide as the second network.
    sampler = config.replace(**{"sampler.method": "dpm2m", "sampler.schedule": "shifted", "sampler.shift": 2.0,
                                "sampler.cfg_scale": 2.5, "sampler.interval_min": 0.0})
    apply_kernels(guide_net, guide_net.blocks, weaker.kernels, CPU, sampling=True)
    direct = sample_classes(net, sampler, [2], 2, seed=0, device=CPU, guide=guide_net).permute(0, 2, 3, 1).numpy()
    assert_same_images(direct, guided)

    wrong = config.replace(**{"model.num_classes": 7})
    bad = save_model_file(tmp_path / "bad.safetensors", wrong, {"net": JiT(wrong.model).state_dict()})
    assert main(args[:2] + [str(tmp_path / "grid.png")] + args[3:] + ["--guide-model", str(bad)]) == 2
    assert "classes 10 vs the guide's 7" in capsys.readouterr().err
