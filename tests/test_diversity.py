"""The per-class diversity probe: distances and correlations against plain loops, the identical and
collapsed limits, and the probe of a tiny random model and pack (`diversity.run_diversity`, `pixelrepa probe
diversity`)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import randomize_
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.distributed import World
from pixelrepa.evaluation import diversity
from pixelrepa.evaluation.sample_folder import SampleSettings, sample_to_folder
from pixelrepa.models.jit import JiT
from pixelrepa.weights import save_model_file

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------
# Plain references
# ---------------------------------------------------------------------------

def loop_distance(x: np.ndarray) -> float:
    n, total = len(x), 0.0
    for i in range(n):
        for j in range(i + 1, n):
            total += math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j])))
    return total / (n * (n - 1) / 2)


def loop_pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((p - ma) * (q - mb) for p, q in zip(a, b))
    return cov / math.sqrt(sum((p - ma) ** 2 for p in a) * sum((q - mb) ** 2 for q in b))


def loop_ranks(a: list[float]) -> list[float]:
    """Rank = 1 + the count of smaller values + (ties - 1) / 2."""
    return [1 + sum(q < p for q in a) + (sum(q == p for q in a) - 1) / 2 for p in a]


def unit_rows(x: np.ndarray) -> np.ndarray:
    return np.array([row / math.sqrt(sum(v * v for v in row)) for row in x])


def test_distances_equal_plain_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 5))
    assert diversity.mean_pairwise_distance(x) == pytest.approx(loop_distance(x), rel=1e-12)
    centroid = x.mean(axis=0)
    plain = sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(row, centroid))) for row in x) / len(x)
    assert diversity.mean_centroid_distance(x) == pytest.approx(plain, rel=1e-12)
    np.testing.assert_allclose(diversity.normalise(x), unit_rows(x), rtol=1e-12)
    assert diversity.mean_pairwise_distance(np.repeat(x[:1], 6, axis=0)) == 0.0  # exactly
    with pytest.raises(ValueError, match="n >= 2"):
        diversity.mean_pairwise_distance(x[:1])


def test_correlations_equal_plain_formulas():
    rng = np.random.default_rng(1)
    a = rng.normal(size=12).tolist()
    b = (np.asarray(a) * 0.5 + rng.normal(size=12)).tolist()
    b[3] = b[7]  # a tie
    assert diversity.pearson(a, b) == pytest.approx(loop_pearson(a, b), rel=1e-12)
    assert diversity.spearman(a, b) == pytest.approx(loop_pearson(loop_ranks(a), loop_ranks(b)), rel=1e-12)
    assert diversity.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert diversity.spearman(a, [math.exp(v) for v in a]) == pytest.approx(1.0)  # monotone
    assert math.isnan(diversity.pearson([1, 2], [3, 4])) and math.isnan(diversity.pearson([1, 1, 1], [1, 2, 3]))
    # non-finite pairs are left out
    assert diversity.pearson(a + [math.nan], b + [1.0]) == pytest.approx(diversity.pearson(a, b))


def labelled_features(seed: int, classes: int = 4, per_class: int = 10, dim: int = 6):
    """Class c: a centre plus noise of scale (c + 1) / 4, so the classes differ in tightness."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + rng.normal(size=(len(labels), dim)) * ((labels[:, None] + 1) / 4)
    return features, labels


def test_class_metrics_against_direct_computation():
    real, labels = labelled_features(2)
    generated, gen_labels = labelled_features(3)
    results = diversity.class_metrics(generated, gen_labels, real, labels, [0, 1, 2, 3])
    for c, values in results.items():
        g, r = unit_rows(generated[gen_labels == c]), unit_rows(real[labels == c])
        assert values["gen_distance"] == pytest.approx(loop_distance(g), rel=1e-10)
        assert values["real_distance"] == pytest.approx(loop_distance(r), rel=1e-10)
        assert values["ratio"] == pytest.approx(loop_distance(g) / loop_distance(r), rel=1e-10)
        assert values["real_tightness"] == pytest.approx(diversity.mean_centroid_distance(r), rel=1e-12)
        assert 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1
        assert (values["n_generated"], values["n_real"]) == (10, 10)


def test_identical_sets_and_a_collapsed_set():
    real, labels = labelled_features(4)
    same = diversity.class_metrics(real, labels, real.copy(), labels, [0, 1, 2, 3])
    for values in same.values():
        assert values["ratio"] == 1.0 and values["precision"] == 1.0 and values["recall"] == 1.0
    collapsed = real.copy()
    for c in range(4):  # every generated image of class c is a copy of its first real image
        collapsed[labels == c] = real[labels == c][0]
    copies = diversity.class_metrics(collapsed, labels, real, labels, [0, 1, 2, 3])
    for values in copies.values():
        assert values["gen_distance"] == 0.0 and values["ratio"] == 0.0
        assert values["precision"] == 1.0 and values["recall"] < 1.0  # on the data, but covering little of it
    with pytest.raises(ValueError, match="class 2 has 1 generated"):
        diversity.class_metrics(real[:21], labels[:21], real, labels, [2])


def test_summary_ranks_and_correlates():
    real, labels = labelled_features(5, classes=5)
    generated = real.copy()
    rng = np.random.default_rng(6)
    for c in range(5):  # class c keeps a share (c + 1) / 5 of its spread about its first image
        rows = labels == c
        generated[rows] = real[rows][0] + (real[rows] - real[rows][0]) * (c + 1) / 5
    generated += rng.normal(size=generated.shape) * 1e-3
    results = {"encoder": diversity.class_metrics(generated, labels, real, labels, range(5))}
    rows = diversity.table_rows(results, [f"n{c}" for c in range(5)])
    summary = diversity.summarise(rows, ["encoder"], top=2)
    assert [c["class"] for c in summary["most_collapsed"]] == [0, 1]
    assert summary["most_collapsed"][0]["name"] == "n0"
    ratios = [r["encoder_ratio"] for r in rows]
    tightness = [r["encoder_real_tightness"] for r in rows]
    assert summary["correlation"]["encoder"]["pearson"] == pytest.approx(loop_pearson(tightness, ratios))
    assert summary["correlation"]["encoder"]["spearman"] == pytest.approx(
        loop_pearson(loop_ranks(tightness), loop_ranks(ratios)))
    assert summary["mean_ratio"]["encoder"] == pytest.approx(sum(ratios) / 5)
    assert summary["tightness_space"] == "encoder"


def test_image_set_selection_and_classes():
    labels = np.array([0, 1, 0, 1, 2, 0, 2, 1])
    chosen = diversity.select_per_class(labels, [0, 1], 2, seed=3)
    assert len(chosen) == 4 and sorted(labels[chosen].tolist()) == [0, 0, 1, 1]
    assert np.array_equal(chosen, diversity.select_per_class(labels, [0, 1], 2, seed=3))
    assert diversity.select_per_class(labels, [2], None).tolist() == [4, 6]
    assert diversity.common_classes(np.array([0, 1, 2]), np.array([1, 2, 3])) == [1, 2]
    with pytest.raises(ValueError, match="no class is in both"):
        diversity.common_classes(np.array([0]), np.array([1]))
    with pytest.raises(ValueError, match="class 0 has no real"):
        diversity.common_classes(np.array([0, 1]), np.array([1]), [0, 1])

    images = torch.arange(8 * 3 * 2 * 2, dtype=torch.uint8).view(8, 3, 2, 2)
    stand_in = diversity.ImageSet.from_tensor(images, labels)
    flat = diversity.extract(lambda x: (x.flatten(1).float(),), stand_in, np.array([1, 3, 4]), batch_size=2)
    np.testing.assert_array_equal(flat, images[[1, 3, 4]].flatten(1).numpy())


# ---------------------------------------------------------------------------
# `run_diversity` and `pixelrepa probe diversity` on a tiny random model and pack
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random PixelREPA-Micro/8 model file (Lite0 at 64 px, 2 Euler steps) and a pack of 3 classes x 8."""
    root = tmp_path_factory.mktemp("diversity")
    config = get_preset("PixelREPA-Micro/8").replace(**{"align.encoder.img_size": 64, "sampler.steps": 2,
                                                        "sampler.method": "euler"})
    torch.manual_seed(0)
    net = randomize_(JiT(config.model), std=0.05)
    save_model_file(root / "model.safetensors", config, {"net": net.state_dict()})
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 3, 5], 8)
    pack_arrays(rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8), labels, root / "pack",
                [f"class{c}" for c in range(10)], source="random")
    return root


def read_outputs(out):
    with open(out / "diversity.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "diversity.json").read_text())


def run(samples, out, **changes) -> diversity.DiversityResult:
    """`run_diversity` on the CPU, encoder space only."""
    return diversity.run_diversity(diversity.DiversitySettings(samples, out=out, **changes), CPU)


def test_probe_diversity_run(tiny, tmp_path, capsys):
    out = tmp_path / "fly"
    base = dict(data=tiny / "pack", real_per_class=6, spaces=("encoder",), top=2, batch_size=5)
    result = run(tiny / "model.safetensors", out, per_class=4, **base)
    assert "sampling 3 classes x 4 (euler 2 steps" in capsys.readouterr().err
    printed = diversity.format_table(result.rows, result.summary, result.spaces)
    assert "most collapsed" in printed and "class3" in printed

    rows, record = read_outputs(out)
    assert [r["class"] for r in rows] == ["0", "3", "5"] and [r["name"] for r in rows][0] == "class0"
    assert [r["class"] for r in result.rows] == [0, 3, 5] and result.spaces == ["encoder"]
    assert record["format"] == diversity.DIVERSITY_FORMAT
    assert record["generated"]["kind"] == "sampled" and record["generated"]["used"] == 12
    assert record["real"]["used"] == 18 and record["encoder"]["from"] == "run config"
    assert record["encoder"]["name"] == "efficientnet-lite0" and record["settings"]["classes"] == [0, 3, 5]
    assert record["settings"] == result.record["settings"]
    for row, result_row in zip(rows, record["results"]):
        assert (int(row["n_generated"]), int(row["n_real"])) == (4, 6)
        for key in ("encoder_ratio", "encoder_gen_distance", "encoder_real_tightness", "encoder_precision"):
            assert float(row[key]) == pytest.approx(result_row[key], rel=1e-5)
        assert result_row["encoder_ratio"] == pytest.approx(
            result_row["encoder_gen_distance"] / result_row["encoder_real_distance"])
    summary = record["summary"]
    ratios = [r["encoder_ratio"] for r in record["results"]]
    assert summary["mean_ratio"]["encoder"] == pytest.approx(sum(ratios) / 3)
    assert [c["ratio"] for c in summary["most_collapsed"]] == sorted(ratios)[:2]
    assert summary["most_collapsed"] == result.summary["most_collapsed"]
    assert summary["correlation"]["encoder"]["pearson"] == pytest.approx(
        loop_pearson([r["encoder_real_tightness"] for r in record["results"]], ratios))
    with Image.open(out / "diversity.png") as image:
        assert image.size[0] > 100 and len(image.convert("RGB").getcolors(1 << 16)) > 2
    with Image.open(out / "collapsed.png") as image:
        assert image.size[1] > 4 * 64  # 2 classes x (generated, real) rows of 64-px tiles

    # The same images written to a sample folder, read back from it: the same numbers.
    folder = tmp_path / "samples"
    sample_to_folder(SampleSettings(tiny / "model.safetensors", folder, classes=(0, 3, 5), per_class=4,
                                    format="png"), World(rank=0, world_size=1, local_rank=0, device=CPU))
    again = run(folder, tmp_path / "folder", **base).record
    assert again["generated"]["kind"] == "sample folder (PNGs)" and again["encoder"]["from"] == "run config"
    _, again = read_outputs(tmp_path / "folder")
    for a, b in zip(again["results"], record["results"]):
        assert a["encoder_ratio"] == pytest.approx(b["encoder_ratio"], rel=1e-4, abs=1e-6)

    # The real images as the "generated" set: ratio 1, precision = recall = 1.
    from pixelrepa.data.packed import PackedDataset

    pack = PackedDataset(tiny / "pack")
    np.savez(tmp_path / "real.npz", arr_0=np.asarray(pack.images), labels=pack.labels)
    same = run(tmp_path / "real.npz", tmp_path / "same", data=tiny / "pack", spaces=("encoder",),
               encoder="efficientnet-lite0", real_per_class=8)
    assert same.record["encoder"]["from"] == "--encoder"
    for row in same.rows:
        assert row["encoder_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert row["encoder_precision"] == 1.0 and row["encoder_recall"] == 1.0


def test_probe_diversity_command(tiny, tmp_path, capsys):
    """`pixelrepa probe diversity`: the flags reach the settings, the table and the files are reported."""
    out = tmp_path / "out"
    assert main(["probe", "diversity", str(tiny / "model.safetensors"), "--data", str(tiny / "pack"), "--per-class",
                 "3", "--real-per-class", "4", "--classes", "3", "5", "--spaces", "encoder", "--top", "1",
                 "--steps", "1", "--cfg", "1.5", "--seed", "2", "--batch-size", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "most collapsed (encoder ratio)" in printed and "class5" in printed
    assert printed.endswith(f"wrote {out / 'diversity.csv'}, diversity.json, diversity.png, collapsed.png\n")
    _, record = read_outputs(out)
    generated = record["generated"]
    assert (generated["per_class"], generated["seed"], generated["sampler"]["steps"],
            generated["sampler"]["cfg_scale"]) == (3, 2, 1, 1.5)
    assert record["settings"]["classes"] == [3, 5] and record["settings"]["top"] == 1
    assert (record["real"]["per_class"], record["real"]["used"], record["settings"]["device"]) == (4, 8, "cpu")


def test_probe_diversity_errors(tiny, tmp_path, capsys):
    base = ["--data", str(tiny / "pack"), "--spaces", "encoder", "--device", "cpu", "--out", str(tmp_path)]
    model = str(tiny / "model.safetensors")
    assert main(["probe", "diversity", model, "--per-class", "1", *base]) == 2
    assert "--per-class must be >= 2" in capsys.readouterr().err
    assert main(["probe", "diversity", model, "--classes", "1", *base]) == 2
    assert "class 1 has no real images" in capsys.readouterr().err
    assert main(["probe", "diversity", str(tmp_path / "nothing"), *base]) == 2
    assert "no sample folder" in capsys.readouterr().err
    np.savez(tmp_path / "unlabelled.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    assert main(["probe", "diversity", str(tmp_path / "unlabelled.npz"), *base, "--encoder",
                 "efficientnet-lite0"]) == 2
    assert "'labels'" in capsys.readouterr().err
    np.savez(tmp_path / "npz.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    assert main(["probe", "diversity", str(tmp_path / "npz.npz"), *base]) == 2
    assert "pass --encoder PRESET" in capsys.readouterr().err
    assert main(["probe", "diversity", str(tmp_path / "npz.npz"), *base, "--cfg", "2"]) == 2
    assert "holds samples already" in capsys.readouterr().err
    assert not (tmp_path / "diversity.csv").exists()
