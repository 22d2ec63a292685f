"""`pixelrepa data pack` from the forms data sets come in: one small image set written as an image
folder, a `datasets` save_to_disk folder, parquet files, WebDataset tar shards and an EDM2 zip
packs to the same bytes; bad input is skipped or refused by the folder's policy."""

from __future__ import annotations

import io
import os
import tarfile
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.data import packed, sources
from pixelrepa.data.packed import pack_images
from pixelrepa.data.sources import open_source, pack_source

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

CLASSES = ["cat", "dog", "fox"]
SIZE = 8


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_set() -> list[tuple[bytes, int]]:
    """(PNG bytes, label) in folder order (class by class), of several sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    shapes = [(12, 16), (9, 9), (20, 11), (8, 8), (16, 30), (10, 13), (24, 24)]
    labels = [0, 0, 0, 1, 1, 2, 2]
    return [(png(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)), label) for shape, label in zip(shapes, labels)]


def write_folder(root: Path, items) -> Path:
    for k, (data, label) in enumerate(items):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (root / CLASSES[label] / f"{k:03d}.png").write_bytes(data)
    return root


def hf_dataset(items, bad: bytes | None = None):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    images = [{"bytes": data, "path": None} for data, _ in items]
    if bad is not None:
        images[1] = {"bytes": bad, "path": None}
    return datasets.Dataset.from_dict({"image": images, "label": [label for _, label in items]}, features=features)


def write_shards(root: Path, items, per_shard: int = 3, drop_label_of: int | None = None) -> Path:
    root.mkdir(parents=True)
    for shard in range(0, len(items), per_shard):
        with wds.TarWriter(str(root / f"train-{shard // per_shard:04d}.tar")) as writer:
            for k in range(shard, min(shard + per_shard, len(items))):
                data, label = items[k]
                sample = {"__key__": f"sample{k:06d}", "png": data, "cls": label}
                if k == drop_label_of:
                    del sample["cls"]
                writer.write(sample)
    return root


def write_edm2_zip(path: Path, items, labels: list | None = None) -> Path:
    names = [f"{k // 1000:05d}/img{k:08d}.png" for k in range(len(items))]
    with zipfile.ZipFile(path, "w") as archive:
        for name, (data, _) in zip(names, items):
            archive.writestr(name, data)
        listed = [[name, label] for name, (_, label) in zip(names, items)] if labels is None else labels
        archive.writestr("dataset.json", json.dumps({"labels": listed}))
    return path


def data_files(pack: Path) -> tuple[bytes, bytes]:
    return (pack / packed.IMAGES).read_bytes(), (pack / packed.LABELS).read_bytes()


def test_every_form_packs_to_the_same_images_and_labels(image_set, tmp_path):
    folder = write_folder(tmp_path / "folder", image_set)
    hf_dataset(image_set).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "parquet").mkdir()
    hf_dataset(image_set[:4]).to_parquet(str(tmp_path / "parquet" / "train-00000-of-00002.parquet"))
    hf_dataset(image_set[4:]).to_parquet(str(tmp_path / "parquet" / "train-00001-of-00002.parquet"))
    shards = write_shards(tmp_path / "shards", image_set)
    edm2 = write_edm2_zip(tmp_path / "edm2.zip", image_set)

    reference = pack_source(folder, tmp_path / "packs" / "folder", SIZE)
    forms = {"hf": (tmp_path / "hf", 2), "parquet": (tmp_path / "parquet", 1), "shards": (shards, 2),
             "glob": (str(shards / "train-*.tar"), 1), "edm2": (edm2, 1)}
    for name, (src, workers) in forms.items():
        manifest = pack_source(src, tmp_path / "packs" / name, SIZE, workers=workers)
        assert data_files(tmp_path / "packs" / name) == data_files(tmp_path / "packs" / "folder"), name
        assert manifest["count"] == reference["count"] == 7 and manifest["skipped"] == []
    for name in ("hf", "parquet"):  # class names from the ClassLabel feature
        assert json.loads((tmp_path / "packs" / name / packed.MANIFEST).read_text())["class_names"] == CLASSES
    assert json.loads((tmp_path / "packs" / "shards" / packed.MANIFEST).read_text())["class_names"] == ["0", "1", "2"]


def test_columns_are_detected_or_named(image_set, tmp_path):
    table = datasets.Dataset.from_dict({"picture": [data for data, _ in image_set],
                                        "category": [CLASSES[label] for _, label in image_set]})
    table.to_parquet(str(tmp_path / "plain.parquet"))  # plain bytes and string labels: no features say which
    with pytest.raises(ValueError, match="no image column found among picture, category; name it with --image-column"):
        open_source(tmp_path / "plain.parquet", SIZE)
    reader = open_source(tmp_path / "plain.parquet", SIZE, image_column="picture", label_column="category")
    assert reader.class_names == CLASSES and list(reader.labels) == [label for _, label in image_set]
    with pytest.raises(ValueError, match="has no column 'labels'"):
        open_source(tmp_path / "plain.parquet", SIZE, image_column="picture", label_column="labels")
    with pytest.raises(ValueError, match="--image-column / --label-column name the columns"):
        open_source(write_edm2_zip(tmp_path / "e.zip", image_set), SIZE, image_column="x")


def test_an_undecodable_image_is_skipped_and_named(image_set, tmp_path, capsys):
    hf_dataset(image_set, bad=b"not an image").save_to_disk(str(tmp_path / "hf"))
    assert main(["data", "pack", str(tmp_path / "hf"), str(tmp_path / "pack"), "--size", str(SIZE)]) == 0
    out = capsys.readouterr().out
    assert "skipped       1" in out and f"{tmp_path / 'hf'} row 1: failed to load" in out
    manifest = json.loads((tmp_path / "pack" / packed.MANIFEST).read_text())
    assert manifest["count"] == 6 and manifest["skipped"][0].startswith(f"{tmp_path / 'hf'} row 1")

    shards = write_shards(tmp_path / "shards", [image_set[0], (b"\xff\xd8 truncated", 1), image_set[2]])
    manifest = pack_source(shards, tmp_path / "wds-pack", SIZE)
    assert manifest["count"] == 2 and "train-0000.tar sample 'sample000001': failed to load" in manifest["skipped"][0]


def test_a_sample_without_a_label_stops_naming_shard_and_key(image_set, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", image_set, drop_label_of=4)
    assert main(["data", "pack", str(shards), str(tmp_path / "pack"), "--size", str(SIZE)]) == 2
    assert "train-0001.tar: sample 'sample000004' has no label (a cls member)" in capsys.readouterr().err
    assert not (tmp_path / "pack").exists()  # refused before anything is written

    table = hf_dataset(image_set).cast_column("label", datasets.Value("int64"))
    table = table.map(lambda row, k: {"label": None if k == 2 else row["label"]}, with_indices=True)
    table.to_parquet(str(tmp_path / "nulls.parquet"))
    with pytest.raises(ValueError, match=r"nulls.parquet row 2 has no label"):
        open_source(tmp_path / "nulls.parquet", SIZE)

    names = [f"00000/img{k:08d}.png" for k in range(len(image_set))]
    unlisted = write_edm2_zip(tmp_path / "edm2.zip", image_set, [[n, 0] for n in names[:-1]])
    with pytest.raises(ValueError, match=r"edm2.zip: 00000/img00000006.png has no label in dataset.json"):
        open_source(unlisted, SIZE)
    unconditional = write_edm2_zip(tmp_path / "uncond.zip", image_set, labels=None)
    (tmp_path / "uncond.zip").unlink()
    with zipfile.ZipFile(unconditional, "w") as archive:
        archive.writestr("00000/img00000000.png", image_set[0][0])
        archive.writestr("dataset.json", json.dumps({"labels": None}))
    with pytest.raises(ValueError, match="null"):
        open_source(unconditional, SIZE)


def test_an_interrupted_pack_of_shards_resumes_to_the_same_bytes(image_set, tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "shards", image_set)
    pack_source(shards, tmp_path / "whole", SIZE)
    reader = open_source(shards, SIZE)
    read = sources.WebDatasetShards.encoded

    def dies_at_five(self, index):
        if index == 5:
            raise KeyboardInterrupt
        return read(self, index)

    monkeypatch.setattr(sources.WebDatasetShards, "encoded", dies_at_five)
    with pytest.raises(KeyboardInterrupt):
        pack_images(reader, tmp_path / "resumed", SIZE, reader.class_names, source_name=reader.name,
                    source_hash=reader.source_hash, chunk_size=2)
    monkeypatch.undo()
    assert json.loads((tmp_path / "resumed" / packed.PROGRESS).read_text())["written"] == 4
    pack_source(shards, tmp_path / "resumed", SIZE)
    assert data_files(tmp_path / "resumed") == data_files(tmp_path / "whole")
    write_shards(tmp_path / "other", image_set[:6])
    with pytest.raises(ValueError, match="already holds a finished pack"):
        pack_source(tmp_path / "other", tmp_path / "resumed", SIZE)


def test_an_interrupted_overwrite_keeps_the_old_pack_and_resumes(image_set, tmp_path, monkeypatch, capsys):
    shards = write_shards(tmp_path / "shards", image_set)
    pack_source(shards, tmp_path / "whole", SIZE)
    dst = tmp_path / "pack"
    pack_source(write_shards(tmp_path / "old", image_set[:4]), dst, SIZE)
    before = {file.name: file.read_bytes() for file in dst.iterdir()}
    monkeypatch.setattr(packed, "CHUNK_BYTES", 2 * SIZE * SIZE * 3)  # 2 items per committed chunk
    read, reads = sources.WebDatasetShards.encoded, []

    def dies_at_five(self, index):
        if index == 5:
            raise KeyboardInterrupt
        return read(self, index)

    def counted(self, index):
        reads.append(index)
        return read(self, index)

    monkeypatch.setattr(sources.WebDatasetShards, "encoded", dies_at_five)
    command = ["data", "pack", str(shards), str(dst), "--size", str(SIZE), "--overwrite"]
    assert main(command) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert {file.name: file.read_bytes() for file in dst.iterdir()} == before
    assert json.loads((tmp_path / "pack.partial" / packed.PROGRESS).read_text())["written"] == 4
    monkeypatch.setattr(sources.WebDatasetShards, "encoded", counted)
    assert main(command) == 0
    assert reads == list(range(4, len(image_set)))  # continued after the committed chunks
    assert data_files(dst) == data_files(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "pack", "shards", "whole"]


def test_reading_shards_keeps_one_shard_open_at_a_time(image_set, tmp_path):
    reader = open_source(write_shards(tmp_path / "shards", image_set, per_shard=2), SIZE)  # 4 shards
    before = len(os.listdir("/proc/self/fd"))
    for index in range(len(reader)):
        reader[index]
    assert len(os.listdir("/proc/self/fd")) - before <= 1  # a pack of thousands of shards stays under the fd limit


def test_a_truncated_shard_is_refused_naming_it(image_set, tmp_path):
    shards = write_shards(tmp_path / "shards", image_set, per_shard=4)
    data = (shards / "train-0000.tar").read_bytes()
    with tarfile.open(shards / "train-0000.tar") as tar:
        third = [member for member in tar][4]  # the first member of the third sample: cut just before it
    (shards / "train-0000.tar").write_bytes(data[:third.offset])
    with pytest.raises(ValueError, match=r"train-0000.tar ends after sample 'sample000001' without .*truncated"):
        open_source(shards, SIZE)


def test_a_folder_of_several_splits_is_refused(image_set, tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    hf_dataset(image_set[:4]).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    hf_dataset(image_set[4:]).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"several splits \(test: 1 file, train: 1 file\).*data/\*train\*.parquet"):
        open_source(tmp_path / "hub", SIZE)
    assert len(open_source(str(tmp_path / "hub" / "data" / "*train*.parquet"), SIZE)) == 4

    for split in ("train", "validation"):
        with wds.TarWriter(str(tmp_path / f"imagenet-{split}-000000.tar")) as writer:
            writer.write({"__key__": split, "png": image_set[0][0], "cls": 0})
    with pytest.raises(ValueError, match=r"several splits \(train: 1 file, validation: 1 file\)"):
        open_source(tmp_path, SIZE)


def test_a_path_with_glob_characters_is_a_path(image_set, tmp_path):
    shards = write_shards(tmp_path / "shards [v2]", image_set)
    assert len(open_source(shards, SIZE)) == len(image_set)


def test_several_label_or_image_columns_must_be_named(image_set, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "fine_label": datasets.ClassLabel(names=CLASSES),
                                  "coarse_label": datasets.ClassLabel(names=["pet", "wild"])})
    table = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data, _ in image_set],
                                        "fine_label": [label for _, label in image_set],
                                        "coarse_label": [int(label == 2) for _, label in image_set]},
                                       features=features)
    table.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"several label columns \(fine_label, coarse_label\); name one with "
                                         "--label-column"):
        open_source(tmp_path / "hf", SIZE)
    reader = open_source(tmp_path / "hf", SIZE, label_column="coarse_label")
    assert reader.class_names == ["pet", "wild"] and list(reader.labels) == [0, 0, 0, 0, 0, 1, 1]


def test_edm2_labels_that_are_not_name_label_pairs_are_refused(image_set, tmp_path):
    for k, labels in enumerate(([label for _, label in image_set], {"00000/img00000000.png": 0})):
        with pytest.raises(ValueError, match=r"dataset.json: 'labels' is not a list of \[file name, label\] pairs"):
            open_source(write_edm2_zip(tmp_path / f"e{k}.zip", image_set, labels), SIZE)


def test_a_class_no_item_has_is_refused_unless_allowed(image_set, tmp_path, capsys):
    without_dog = [item for item in image_set if item[1] != 1]
    shards = write_shards(tmp_path / "shards", without_dog)  # labels 0 and 2: class "1" has no image
    assert main(["data", "pack", str(shards), str(tmp_path / "refused"), "--size", str(SIZE)]) == 2
    assert "1 of its 3 classes have no image (1); keep them as empty classes" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    hf_dataset(without_dog).save_to_disk(str(tmp_path / "hf"))  # ClassLabel names: "dog" has no image
    with pytest.raises(ValueError, match=r"1 of its 3 classes have no image \(dog\)"):
        pack_source(tmp_path / "hf", tmp_path / "refused", SIZE)
    manifest = pack_source(tmp_path / "hf", tmp_path / "kept", SIZE, allow_empty_classes=True)
    assert manifest["class_names"] == CLASSES and manifest["count"] == len(without_dog)
