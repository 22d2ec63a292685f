"""Cached encoder targets (align.target_cache): same training, refused when stale, resumable."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrepa.config import get_preset
from pixelrepa.data.packed import PackedDataset, pack_arrays
from pixelrepa.training import targets as target_cache
from pixelrepa.training.runlock import PREEMPTED_EXIT_CODE, Preempted
from pixelrepa.distributed import World
from pixelrepa.training.trainer import train

CPU_RANK0 = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_pack(path: Path, seed: int = 0, count: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    pack_arrays(images, rng.integers(0, 10, size=count), path, [str(c) for c in range(10)], source=f"random-{seed}")
    return path


def config_for(pack: Path, out: Path, mode: str = "pixelrepa", **overrides):
    preset = {"pixelrepa": "PixelREPA-Micro/8", "repa": "REPA-Micro/8", "irepa": "iREPA-Micro/8"}[mode]
    changes = {
        "data.source": str(pack), "data.num_workers": 0, "data.hflip": True,
        "train.out_dir": str(out), "train.steps": 6, "train.per_device_batch": 8, "train.log_every": 1,
        "train.ckpt_every": 6, "train.sample_every": None, "optim.global_batch": 8, "optim.lr": 1e-3,
        "align.encoder.img_size": 64,  # Lite0 at 64 px: a 4 x 4 grid of 112 channels, the Micro/8 grid
    }
    changes.update(overrides)
    return get_preset(preset).replace(**changes)


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"total"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pixelrepa", "repa"])
def test_training_with_the_cache_equals_training_without(tmp_path, mode):
    pack = make_pack(tmp_path / "pack")
    train(config_for(pack, tmp_path / "plain", mode), progress=False)
    train(config_for(pack, tmp_path / "cached", mode, **{"align.target_cache": "auto"}), progress=False)
    plain, cached = logged(tmp_path / "plain"), logged(tmp_path / "cached")
    assert [r["step"] for r in plain] == [r["step"] for r in cached] == list(range(1, 7))
    for a, b in zip(plain, cached):
        for key in ("denoise", "align", "total"):
            # Same draws, same flipped images; only the encoder's batch composition differs.
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])
    folder = next((pack / "targets").iterdir())
    record = json.loads((folder / target_cache.MANIFEST).read_text())
    assert record["complete"] and record["orientations"] == 2 and record["count"] == 48
    assert record["grid"] == [4, 4] and record["channels"] == 112 and record["dtype"] == "float32"
    assert not (folder / target_cache.DONE).exists()


@pytest.mark.slow
def test_one_cache_of_raw_features_serves_repa_and_irepa(tmp_path):
    """The cache holds the encoder's raw features; iREPA's spatial z-score is applied at loss time,
    so an iREPA run reads the cache a REPA run built and trains as it does without a cache."""
    pack = make_pack(tmp_path / "pack")
    train(config_for(pack, tmp_path / "repa", "repa", **{"align.target_cache": "auto"}), progress=False)
    built = sorted((pack / "targets").iterdir())
    stamp = [(f, f.stat().st_mtime_ns) for f in sorted(built[0].iterdir())]
    train(config_for(pack, tmp_path / "plain", "irepa"), progress=False)
    train(config_for(pack, tmp_path / "cached", "irepa", **{"align.target_cache": "auto"}), progress=False)
    assert sorted((pack / "targets").iterdir()) == built and len(built) == 1
    assert [(f, f.stat().st_mtime_ns) for f in sorted(built[0].iterdir())] == stamp  # read, not rebuilt
    plain, cached = logged(tmp_path / "plain"), logged(tmp_path / "cached")
    assert len(plain) == len(cached) == 6
    for a, b in zip(plain, cached):
        for key in ("denoise", "align", "total"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])


def test_cached_targets_are_the_encoders_features_of_each_orientation(tmp_path):
    from pixelrepa.align.encoders import build_encoder
    from pixelrepa.data.transforms import to_model_range

    pack = make_pack(tmp_path / "pack", count=20)
    config = config_for(pack, tmp_path / "run", **{"align.target_cache": "auto"})
    dataset = PackedDataset(pack, hflip=True, seed=0)
    encoder = build_encoder(config.align.encoder)
    cached = target_cache.with_target_cache(config, dataset, encoder, CPU_RANK0, progress=False)
    images = torch.from_numpy(np.ascontiguousarray(dataset.images[:].transpose(0, 3, 1, 2)))
    x = to_model_range(images)
    for epoch in (0, 1):
        for index in range(20):
            image, label, target = cached[(index, epoch)]
            flipped = dataset.flipped(index, epoch)
            source = x[index:index + 1].flip(-1) if flipped else x[index:index + 1]
            expected = encoder(source, (4, 4))[0]  # alone, where the cache ran batches: float32 rounding apart
            assert (target - expected).norm() <= 1e-5 * expected.norm(), (index, epoch)
            assert torch.equal(image, dataset[(index, epoch)][0]) and label == dataset[(index, epoch)][1]


def test_a_stale_cache_is_refused_by_name(tmp_path):
    pack = make_pack(tmp_path / "pack")
    folder = tmp_path / "cache"
    base = {"align.target_cache": str(folder), "train.steps": 1, "train.ckpt_every": 1}
    train(config_for(pack, tmp_path / "first", **base), progress=False)
    # Another encoder resolution, flips off (one orientation), another pack at the same path.
    with pytest.raises(ValueError, match=r"encoder: cache .*'img_size': 64.*delete it"):
        train(config_for(pack, tmp_path / "res", **base, **{"align.encoder.img_size": 96}), progress=False)
    with pytest.raises(ValueError, match="orientations: cache 2, run 1"):
        train(config_for(pack, tmp_path / "noflip", **base, **{"data.hflip": False}), progress=False)
    other = make_pack(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="pack_images_sha256") as refused:
        train(config_for(other, tmp_path / "other-run", **base), progress=False)
    assert str(folder) in str(refused.value)


def test_an_interrupted_build_resumes_with_the_missing_chunks_only(tmp_path, monkeypatch):
    from pixelrepa.align.encoders import build_encoder

    monkeypatch.setattr(target_cache, "CHUNK_IMAGES", 8)
    pack = make_pack(tmp_path / "pack", count=40)  # 5 chunks
    config = config_for(pack, tmp_path / "run", **{"align.target_cache": "auto", "train.per_device_batch": 4})
    dataset = PackedDataset(pack, hflip=True, seed=0)
    encoder = build_encoder(config.align.encoder)
    calls = {"n": 0}
    original = type(encoder).forward

    def failing_forward(self, x, grid):
        calls["n"] += 1
        if calls["n"] > 9:  # 2 batches x 2 orientations per chunk: dies inside the third chunk
            raise KeyboardInterrupt
        return original(self, x, grid)

    monkeypatch.setattr(type(encoder), "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        target_cache.with_target_cache(config, dataset, encoder, CPU_RANK0, progress=False)
    folder = target_cache.cache_folder(config, pack)
    assert sorted(p.name for p in (folder / target_cache.DONE).iterdir()) == ["0", "1"]
    assert not json.loads((folder / target_cache.MANIFEST).read_text())["complete"]

    calls["n"] = -10**9  # no more failures; count the resumed batches
    resumed = target_cache.with_target_cache(config, dataset, encoder, CPU_RANK0, progress=False)
    assert calls["n"] + 10**9 == 3 * 2 * 2  # chunks 2, 3, 4 only
    monkeypatch.setattr(type(encoder), "forward", original)
    fresh_config = config.replace(**{"align.target_cache": str(tmp_path / "fresh")})
    fresh = target_cache.with_target_cache(fresh_config, dataset, encoder, CPU_RANK0, progress=False)
    for index in range(40):
        assert torch.equal(resumed[(index, 0)][2], fresh[(index, 0)][2])
        assert torch.equal(resumed[(index, 1)][2], fresh[(index, 1)][2])


def test_a_stop_signal_during_the_build_ends_the_run_after_its_chunk(tmp_path, monkeypatch):
    """A preemption while the targets are built (hours on ImageNet) is honoured after the chunk at
    hand, like one during training: the run exits for a requeue and the next one builds the rest."""
    from pixelrepa.align.encoders import build_encoder

    monkeypatch.setattr(target_cache, "CHUNK_IMAGES", 8)
    pack = make_pack(tmp_path / "pack", count=40)  # 5 chunks of 2 batches x 2 orientations
    config = config_for(pack, tmp_path / "run", **{"align.target_cache": "auto", "train.per_device_batch": 4})
    encoder_class = type(build_encoder(config.align.encoder))
    original, calls = encoder_class.forward, {"n": 0}

    def forward(self, x, grid):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second chunk
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, x, grid)

    monkeypatch.setattr(encoder_class, "forward", forward)
    with pytest.raises(Preempted, match="SIGTERM while building the encoder target cache") as stopped:
        train(config, progress=False)
    assert stopped.value.exit_code == PREEMPTED_EXIT_CODE and calls["n"] == 8
    folder = target_cache.cache_folder(config, pack)
    assert sorted(p.name for p in (folder / target_cache.DONE).iterdir()) == ["0", "1"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # no training step ran
    train(config, progress=False)
    assert calls["n"] == 8 + 3 * 4  # chunks 2, 3, 4 only
    assert json.loads((folder / target_cache.MANIFEST).read_text())["complete"]
    assert [r["step"] for r in logged(tmp_path / "run")] == list(range(1, 7))


def test_the_cache_needs_a_pack(tmp_path):
    from PIL import Image

    for c in range(10):
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (c * 20, i * 50, 9)).save(tmp_path / "folder" / f"class{c}" / f"{i}.png")
    config = config_for(tmp_path / "folder", tmp_path / "run", **{"align.target_cache": "auto",
                                                                   "train.per_device_batch": 4,
                                                                   "optim.global_batch": 4})
    with pytest.raises(ValueError, match="pixelrepa data pack"):
        train(config, progress=False)


def test_resuming_with_the_cache_switched_on_continues_the_run(tmp_path):
    pack = make_pack(tmp_path / "pack")
    out = tmp_path / "run"
    train(config_for(pack, out, **{"train.steps": 6, "train.ckpt_every": 3}), progress=False)
    reference = logged(out)
    (out / "log.jsonl").unlink()
    for path in sorted(out.glob("checkpoints/step-*"))[-1:]:
        shutil.rmtree(path)
    train(config_for(pack, out, **{"train.steps": 6, "train.ckpt_every": 3, "align.target_cache": "auto"}),
          progress=False)
    resumed = logged(out)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(reference[3:], resumed):
        assert abs(a["total"] - b["total"]) <= 1e-5 * abs(a["total"])
