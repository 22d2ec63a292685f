"""Representation similarity (CKA, CKNNA, mutual kNN) against plain loops, the probe's taps and noise,
and the probe of a tiny trained run (`probe.run_align`, `pixelrepa probe align`)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import randomize_
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.distributed import World
from pixelrepa.loading import load_backbone_state
from pixelrepa.evaluation import probe
from pixelrepa.evaluation.alignment import cknna, linear_cka, mutual_knn
from pixelrepa.models.jit import JiT

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------
# Plain references: explicit centring matrix, neighbours by sorting each row
# ---------------------------------------------------------------------------

def centred_kernel(x: np.ndarray) -> list[list[float]]:
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    return (h @ (x @ x.T) @ h).tolist()


def neighbours(x: np.ndarray, i: int, k: int) -> set[int]:
    def cosine(a, b):
        return sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    others = sorted((j for j in range(len(x)) if j != i), key=lambda j: -cosine(x[i], x[j]))
    return set(others[:k])


def loop_cka(x: np.ndarray, y: np.ndarray) -> float:
    kx, ky = centred_kernel(x), centred_kernel(y)
    n = len(x)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    cross = sum(kx[i][j] * ky[i][j] for i, j in pairs)
    return cross / math.sqrt(sum(kx[i][j] ** 2 for i, j in pairs) * sum(ky[i][j] ** 2 for i, j in pairs))


def loop_cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    kx, ky = centred_kernel(x), centred_kernel(y)
    n = len(x)
    near_x, near_y = [neighbours(x, i, k) for i in range(n)], [neighbours(y, i, k) for i in range(n)]
    cross = sum(kx[i][j] * ky[i][j] for i in range(n) for j in near_x[i] & near_y[i])
    own_x = sum(kx[i][j] ** 2 for i in range(n) for j in near_x[i])
    own_y = sum(ky[i][j] ** 2 for i in range(n) for j in near_y[i])
    return cross / math.sqrt(own_x * own_y)


def loop_mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    n = len(x)
    return sum(len(neighbours(x, i, k) & neighbours(y, i, k)) / k for i in range(n)) / n


def related_pair(seed: int, n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a noisy linear map of x plus a shared offset: neither identical nor independent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64) + 0.5
    y = x @ torch.randn(12, 7, generator=g, dtype=torch.float64) + 0.8 * torch.randn(n, 7, generator=g,
                                                                                    dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_plain_loops(seed):
    x, y = related_pair(seed)
    xs, ys = x.numpy(), y.numpy()
    assert linear_cka(x, y) == pytest.approx(loop_cka(xs, ys), rel=1e-10)
    assert cknna(x, y, k=5) == pytest.approx(loop_cknna(xs, ys, 5), rel=1e-10)
    assert mutual_knn(x, y, k=5) == pytest.approx(loop_mutual_knn(xs, ys, 5), rel=1e-12)
    assert 0 < mutual_knn(x, y, k=5) < 1 and -1 <= cknna(x, y, k=5) <= 1 and 0 <= linear_cka(x, y) <= 1
    assert linear_cka(x.float(), y.float()) == pytest.approx(linear_cka(x, y), rel=1e-5)  # float64 inside


def test_invariances_and_identical_sets():
    x, _ = related_pair(3)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(4),
                                              dtype=torch.float64))
    assert not torch.allclose(x @ rotation, x)
    for other in (x @ rotation, 3.7 * x, x):
        assert linear_cka(x, other) == pytest.approx(1.0, abs=1e-12)
        assert cknna(x, other, k=5) == pytest.approx(1.0, abs=1e-12)
        assert mutual_knn(x, other, k=5) == 1.0
    assert linear_cka(x, torch.ones_like(x)) != linear_cka(x, torch.ones_like(x))  # NaN: a constant set


def test_independent_sets_score_low():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    assert linear_cka(x, y) < 0.2
    assert abs(cknna(x, y, k=10)) < 0.2
    assert mutual_knn(x, y, k=10) < 0.15  # chance level is k / (n - 1) = 0.03


def test_bad_inputs_are_refused():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(x, torch.randn(9, 3))
    with pytest.raises(ValueError, match="k = 10"):
        cknna(x, x, k=10)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        mutual_knn(x[0], x[0], k=1)


# ---------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return randomize_(JiT(get_preset("JiT-Micro/8").model), std=0.05).eval()


def test_one_pass_taps_equal_the_forward_taps(micro):
    g = torch.Generator().manual_seed(0)
    z, t, y = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 10])
    with torch.no_grad():
        tokens = probe.tapped_tokens(micro, z, t, y, [0, 1, 3, 4])
        for b, tapped in tokens.items():
            torch.testing.assert_close(tapped, micro(z, t, y, tap=b)[1], rtol=0, atol=0)
    assert probe.check_blocks(None, 4) == [1, 2, 3, 4] and probe.check_blocks([3, 0, 3], 4) == [0, 3]
    with pytest.raises(ValueError, match="0 .. depth = 4"):
        probe.check_blocks([5], 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        probe.check_ts([1.5])


def test_probe_does_not_depend_on_the_batch_size(micro):
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.arange(24) % 10

    encoder = fixed_encoder

    def batches(size):
        return [(images[s:s + size], labels[s:s + size]) for s in range(0, 24, size)]

    whole = probe.align_probe(micro, encoder, batches(24), [1, 4], [0.0, 1.0], k=4, seed=3)
    split = probe.align_probe(micro, encoder, batches(7), [1, 4], [0.0, 1.0], k=4, seed=3)
    assert set(whole) == {(1, 0.0), (1, 1.0), (4, 0.0), (4, 1.0)}
    for key, values in whole.items():
        assert set(values) == {"cknna", "cka", "mutual_knn"}
        for metric, value in values.items():
            assert value == pytest.approx(split[key][metric], abs=1e-6)
    other_noise = probe.align_probe(micro, encoder, batches(24), [1], [0.0], k=4, seed=4)
    assert other_noise[(1, 0.0)]["cka"] != whole[(1, 0.0)]["cka"]
    assert probe.align_probe(micro, encoder, [images], [1], [1.0], k=4)[(1, 1.0)]["cka"] \
        != whole[(1, 1.0)]["cka"]  # the null class instead of the labels
    with pytest.raises(ValueError, match="more than 4"):
        probe.align_probe(micro, encoder, [images[:4]], [1], [1.0], k=4)


def fixed_encoder(x, grid):
    """A fixed nonlinear "encoder": (B, 16, 5) tokens of the clean image (32 px, 8 px patches)."""
    return torch.tanh(x.unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2)).flatten(2).transpose(1, 2)
                      @ torch.linspace(-1, 1, 15).view(3, 5))


@pytest.mark.parametrize("mode", ["repa", "pixelrepa"])
def test_head_cosine_is_one_minus_the_alignment_loss(mode):
    from pixelrepa.align.heads import build_align_head, cosine_alignment_loss
    from pixelrepa.objective import head_prediction

    torch.manual_seed(0)
    config = get_preset(f"{'REPA' if mode == 'repa' else 'PixelREPA'}-Micro/8").replace(
        **{"align.encoder.feature_dim": 5, "align.mask_ratio": 0.3})
    net = randomize_(JiT(config.model), std=0.05).eval()
    head = randomize_(build_align_head(config.model, config.align), std=0.05).eval()
    images = torch.randint(0, 256, (10, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    labels = torch.arange(10) % 10
    seed, tap, ts = 5, config.tap_block, [0.3, 1.0]
    features = probe.probe_features(net, fixed_encoder, [(images[:6], labels[:6]), (images[6:], labels[6:])],
                                    [1], ts, seed, 1.0, 0, head, tap, config.align.mask_ratio)
    x = images.float() / 127.5 - 1
    noise, keep = probe.probe_draws(x.shape[1:], 0, 10, seed, 1.0,
                                    config.model.num_patches if mode == "pixelrepa" else None, 0.3)
    assert (keep is None) == (mode == "repa")
    if keep is not None:
        assert 0.1 < 1 - keep.float().mean() < 0.5 and not keep.all(dim=1).all()
        torch.testing.assert_close(noise, probe.probe_draws(x.shape[1:], 0, 10, seed, 1.0)[0], rtol=0, atol=0)
    means = probe.mean_head_cosine(features)
    with torch.no_grad():
        for t in ts:
            level = torch.full((10,), t)
            _, tokens = net(t * x + (1 - t) * noise, level, labels, tap=tap)
            pred = head_prediction(net, head, tokens, keep, level, labels)
            per_image = [1 - cosine_alignment_loss(pred[i:i + 1], fixed_encoder(x[i:i + 1], (4, 4))).item()
                         for i in range(10)]
            np.testing.assert_allclose(features.head_cosines[t].numpy(), per_image, rtol=0, atol=1e-6)
            assert means[t] == pytest.approx(np.mean(per_image), abs=1e-6)
    assert means[0.3] != means[1.0]
    if mode == "pixelrepa":  # the mask matters: all tokens kept gives another cosine
        unmasked = probe.probe_features(net, fixed_encoder, [(images, labels)], [1], ts, seed, 1.0, 0, head, tap, 0.0)
        assert probe.mean_head_cosine(unmasked)[1.0] != pytest.approx(means[1.0], abs=1e-6)


def test_probe_slices_join_to_the_whole(micro):
    """What each torchrun rank computes (a slice, `start` its first image) joins to one process's."""
    images = torch.randint(0, 256, (20, 3, 32, 32), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    whole = probe.probe_features(micro, fixed_encoder, [images], [1, 3], [0.5], seed=2)
    parts = [probe.probe_features(micro, fixed_encoder, [images[a:b]], [1, 3], [0.5], seed=2, start=a)
             for a, b in [(0, 7), (7, 7), (7, 20)]]
    joined = probe.join(parts)
    torch.testing.assert_close(joined.targets, whole.targets)
    for key in whole.pooled:
        torch.testing.assert_close(joined.pooled[key], whole.pooled[key], rtol=1e-5, atol=1e-6)
    assert probe.alignment_table(joined, k=4)[(3, 0.5)]["cka"] == pytest.approx(
        probe.alignment_table(whole, k=4)[(3, 0.5)]["cka"], abs=1e-6)
    shifted = probe.probe_features(micro, fixed_encoder, [images[7:]], [1], [0.5], seed=2)  # start 0: other noise
    assert not torch.allclose(shifted.pooled[(1, 0.5)], whole.pooled[(1, 0.5)][7:])
    with pytest.raises(ValueError, match="no images"):
        probe.join([parts[1]])


# ---------------------------------------------------------------------------
# `run_align` and `pixelrepa probe align` on a tiny trained run
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A PixelREPA-Micro/8 run trained 2 steps (Lite0 at 64 px: the 4 x 4 token grid) on 40 random images."""
    from pixelrepa.training.trainer import train

    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    pack_arrays(rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 40), root / "pack",
                [str(c) for c in range(10)], source="random")
    config = get_preset("PixelREPA-Micro/8").replace(**{
        "data.source": str(root / "pack"), "data.num_workers": 0, "train.out_dir": str(root / "run"),
        "train.steps": 2, "train.per_device_batch": 8, "train.log_every": 1, "train.ckpt_every": 2,
        "train.sample_every": None, "optim.global_batch": 8, "optim.lr": 1e-3, "align.encoder.img_size": 64})
    train(config, progress=False)
    return root


def probe_run(trained_run, out, **changes) -> probe.AlignResult:
    """`run_align` of the run's EMA 1 against its pack, in one process on the CPU."""
    settings = probe.ProbeAlignSettings(trained_run / "run", trained_run / "pack", out, **changes)
    return probe.run_align(settings, World(rank=0, world_size=1, local_rank=0, device=CPU), CPU)


def test_probe_align_run(trained_run, tmp_path, capsys):
    out = tmp_path / "probe"
    changes = dict(blocks=(1, 4), t=(0.5, 1.0), images=32, k=5, batch_size=12)
    result = probe_run(trained_run, out, **changes)
    err = capsys.readouterr().err
    assert "probe cost: 32 images x 2 t = 64 passes through 4 of 4 blocks and the alignment head, 32 encoder " \
           "passes (efficientnet-lite0)" in err and "TFLOP forward" in err
    assert set(result.table) == {(1, 0.5), (1, 1.0), (4, 0.5), (4, 1.0)}
    assert "mean cosine after the alignment head (pixelrepa, tap block" in probe.format_head(result.record["head"])

    with open(out / "alignment.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["block"], r["t"]) for r in rows] == [("1", "0.5"), ("1", "1"), ("4", "0.5"), ("4", "1")]
    record = json.loads((out / "alignment.json").read_text())
    assert record["model"] == result.record["model"] and record["settings"] == result.record["settings"]
    assert record["format"] == probe.PROBE_FORMAT and record["model"]["weights"] == "ema1"
    assert record["model"]["step"] == 2 and (record["data"]["available"], record["data"]["used"]) == (40, 32)
    assert record["encoder"]["name"] == "efficientnet-lite0" and record["encoder"]["from"] == "run config"
    assert record["settings"]["blocks"] == [1, 4] and record["settings"]["t"] == [0.5, 1.0]
    assert (record["settings"]["device"], record["settings"]["world_size"]) == ("cpu", 1)
    for row, line in zip(record["results"], rows):
        assert 0 <= row["cka"] <= 1 and -1 <= row["cknna"] <= 1 and 0 <= row["mutual_knn"] <= 1
        assert float(line["cka"]) == pytest.approx(row["cka"], rel=1e-5)
        assert row["cka"] == pytest.approx(result.table[(row["block"], row["t"])]["cka"])
    with Image.open(out / "alignment.png") as image:
        assert image.size[0] > 2 * image.size[1] > 100  # three heatmaps side by side
        assert len(image.convert("RGB").getcolors(1 << 16)) > 4

    head = record["head"]
    assert head["kind"] == "pixelrepa" and head["mask_ratio"] == 0.2 and "trained weights" in head["source"]
    assert set(head["mean_cosine"]) == {"0.5", "1"} and all(-1 <= v <= 1 for v in head["mean_cosine"].values())

    raw = probe_run(trained_run, tmp_path / "raw", **changes, ema="raw").record
    assert raw["model"]["weights"] == "raw"
    assert json.loads((tmp_path / "raw" / "alignment.json").read_text())["results"] != record["results"]
    assert raw["head"]["mean_cosine"] != head["mean_cosine"]  # same head, the trained backbone under it


@pytest.mark.slow
def test_probe_align_under_torchrun_equals_one_process(trained_run, tmp_path):
    probe_run(trained_run, tmp_path / "one", blocks=(2, 4), t=(0.5,), images=30, k=5, batch_size=8)
    args = ["probe", "align", str(trained_run / "run"), "--data", str(trained_run / "pack"), "--blocks", "2", "4",
            "--t", "0.5", "--images", "30", "--k", "5", "--batch-size", "8", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pixelrepa.cli.main", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("CKNNA (rows: block") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / name / "alignment.json").read_text()) for name in ("one", "two"))
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    for a, b in zip(one["results"], two["results"], strict=True):
        assert (a["block"], a["t"]) == (b["block"], b["t"])
        for metric in probe.METRICS:  # thread counts differ: float32 sums reorder
            assert b[metric] == pytest.approx(a[metric], abs=1e-4)
    for t, value in one["head"]["mean_cosine"].items():
        assert two["head"]["mean_cosine"][t] == pytest.approx(value, abs=1e-5)


def test_probe_align_errors(trained_run, tmp_path, capsys):
    base = ["probe", "align", str(trained_run / "run"), "--data", str(trained_run / "pack"), "--device", "cpu",
            "--out", str(tmp_path)]
    assert main([*base, "--blocks", "9"]) == 2
    assert "0 .. depth = 4" in capsys.readouterr().err
    assert main([*base, "--images", "5", "--k", "5"]) == 2
    assert "more than 5" in capsys.readouterr().err
    assert not (tmp_path / "alignment.csv").exists()

    model_file = tmp_path / "ema2.safetensors"
    assert main(["export", str(trained_run / "run"), str(model_file), "--ema", "2"]) == 0
    assert main(["probe", "align", str(model_file), "--data", str(trained_run / "pack"), "--ema", "2"]) == 2
    assert "one set of weights" in capsys.readouterr().err
    assert main(["probe", "align", str(model_file), "--data", str(trained_run / "pack"), "--images", "12",
                 "--k", "3", "--blocks", "1", "--t", "1", "--out", str(tmp_path / "file")]) == 0
    printed = capsys.readouterr().out
    assert "CKNNA (rows: block, columns: t)" in printed and "t=1" in printed
    assert "mean cosine after the alignment head: none" in printed
    assert printed.endswith(f"wrote {tmp_path / 'file' / 'alignment.csv'}, alignment.json, alignment.png\n")
    assert json.loads((tmp_path / "file" / "alignment.json").read_text())["settings"]["blocks"] == [1]
    why = json.loads((tmp_path / "file" / "alignment.json").read_text())["head"]["why_not"]
    assert "holds no alignment head" in why
    config, state, source = load_backbone_state(model_file)
    _, ema2, _ = load_backbone_state(trained_run / "run", 2)
    assert source["kind"] == "model file" and source["provenance"]["ema"] == "2" and config.model.depth == 4
    assert state.keys() == ema2.keys() and all(torch.equal(state[k], ema2[k]) for k in state)
