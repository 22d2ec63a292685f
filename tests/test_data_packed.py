"""Packed image sets: round trip, manifest checks, resumable and parallel writing, replacing a pack
only once the new one is finished, the `data` command."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.data import packed
from pixelrepa.data.folder import ImageFolderDataset
from pixelrepa.data.idx import find_idx_dir
from pixelrepa.data.loader import make_loader
from pixelrepa.data.packed import PackedDataset, SkippedItem, pack_arrays, pack_folder, pack_images

CLASSES = ["cat", "dog", "fox"]


def random_set(n: int = 20, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 3, (n,), generator=g)


def pack_files(path: Path) -> dict[str, bytes]:
    """The data files' bytes and the manifest without its creation time: equal for equal packs."""
    manifest = json.loads((path / packed.MANIFEST).read_text())
    del manifest["created"]
    return {"images": (path / packed.IMAGES).read_bytes(), "labels": (path / packed.LABELS).read_bytes(),
            "manifest": json.dumps(manifest, sort_keys=True).encode()}


@pytest.fixture
def pack(tmp_path) -> Path:
    pack_arrays(*random_set(), tmp_path / "pack", CLASSES, "random")
    return tmp_path / "pack"


def test_arrays_round_trip(pack):
    images, labels = random_set()
    dataset = PackedDataset(pack, verify_checksum=True, expected_size=8, num_classes=3)
    assert len(dataset) == 20 and dataset.class_names == tuple(CLASSES)
    manifest = dataset.manifest
    assert (manifest["format"], manifest["count"], manifest["size"], manifest["channels"]) == (packed.FORMAT, 20, 8, 3)
    raw = np.fromfile(pack / packed.IMAGES, dtype=np.uint8).reshape(20, 8, 8, 3)  # HWC on disk
    assert np.array_equal(raw, images.permute(0, 2, 3, 1).numpy())
    image, label = dataset[5]
    assert image.dtype == torch.uint8 and torch.equal(image, images[5]) and label == labels[5].item()
    batch, batch_labels = stacked(dataset, [3, 0, 19])
    assert torch.equal(batch, images[[3, 0, -1]]) and torch.equal(batch_labels, labels[[3, 0, -1]])
    with pytest.raises(IndexError):
        dataset[20]
    restored = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker gets: no pixels copied
    assert restored._images is None and torch.equal(restored[7][0], images[7])


def stacked(dataset: PackedDataset, indices, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Items as a batch: (uint8 (B, 3, size, size), int64 (B,))."""
    items = [dataset[i] if epoch is None else dataset[(i, epoch)] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def test_flips_match_item_by_item_and_follow_the_epoch(pack):
    dataset = PackedDataset(pack, hflip=True, seed=3)
    images, _ = random_set()
    batch, _ = stacked(dataset, range(20), epoch=1)
    dataset.set_epoch(1)
    assert torch.equal(batch, stacked(dataset, range(20))[0])  # plain indices follow set_epoch
    assert all(dataset.flipped(i, 1) == (not torch.equal(batch[i], images[i])) for i in range(20))
    flipped = [not torch.equal(batch[i], images[i]) for i in range(20)]
    assert all(torch.equal(batch[i], images[i].flip(-1)) for i in range(20) if flipped[i])
    assert 0 < sum(flipped) < 20
    assert not torch.equal(batch, stacked(dataset, range(20), epoch=2)[0])


def test_make_loader_passes_the_epoch(pack):
    loader = make_loader(PackedDataset(pack, hflip=True), 8, num_workers=0, seed=0)
    loader.set_epoch(4)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 8, 8) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_manifest_problems_are_refused(pack, tmp_path):
    with pytest.raises(ValueError, match="8-px images, 16 px expected"):
        PackedDataset(pack, expected_size=16)
    with pytest.raises(ValueError, match="has 3 classes but the model has num_classes=10: train on it with --set model.num_classes=3"):
        PackedDataset(pack, num_classes=10)

    data = bytearray((pack / packed.IMAGES).read_bytes())
    data[100] ^= 0xFF
    (pack / packed.IMAGES).write_bytes(data)
    PackedDataset(pack)  # sizes are fine: only the full check sees it
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        PackedDataset(pack, verify_checksum=True)

    (pack / packed.IMAGES).write_bytes(data[:-5])
    with pytest.raises(ValueError, match="images.u8 is truncated"):
        PackedDataset(pack)

    manifest = json.loads((pack / packed.MANIFEST).read_text())
    (pack / packed.MANIFEST).write_text(json.dumps({**manifest, "format": "other/2"}))
    with pytest.raises(ValueError, match="format 'other/2' is not 'pixelrepa-pack/1'"):
        PackedDataset(pack)

    (pack / packed.MANIFEST).unlink()
    with pytest.raises(ValueError, match="no manifest.json: not a pixelrepa pack"):
        PackedDataset(pack)
    with pytest.raises(FileNotFoundError):
        PackedDataset(tmp_path / "nowhere")


def items(images: torch.Tensor, labels: torch.Tensor, fail_at: int | None = None, skip: int | None = None):
    """(CHW tensor, label) items; item `skip` is unreadable; the source breaks down at item `fail_at`."""
    for index in range(len(labels)):
        if index == fail_at:
            raise RuntimeError("interrupted")
        yield SkippedItem(f"item {index}") if index == skip else (images[index], labels[index])


def test_interrupted_pack_resumes_to_the_same_bytes(tmp_path):
    images, labels = random_set(23)
    pack_images(items(images, labels, skip=4), tmp_path / "whole", 8, CLASSES, count=23, chunk_size=3)

    with pytest.raises(RuntimeError, match="interrupted"):
        pack_images(items(images, labels, fail_at=10, skip=4), tmp_path / "resumed", 8, CLASSES, count=23,
                    chunk_size=3)
    progress = json.loads((tmp_path / "resumed" / packed.PROGRESS).read_text())
    assert (progress["next"], progress["written"], progress["skipped"]) == (9, 8, ["item 4"])
    with pytest.raises(ValueError, match="unfinished pack .9 of 23"):
        PackedDataset(tmp_path / "resumed")
    with pytest.raises(ValueError, match="different source .capacity, source_hash"):
        pack_images(items(images, labels), tmp_path / "resumed", 8, CLASSES, count=22)

    pack_images(items(images, labels, skip=4), tmp_path / "resumed", 8, CLASSES, count=23, chunk_size=3)
    assert pack_files(tmp_path / "resumed") == pack_files(tmp_path / "whole")
    assert not (tmp_path / "resumed" / packed.PROGRESS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "whole"]  # no sibling without --overwrite
    dataset = PackedDataset(tmp_path / "resumed", verify_checksum=True)
    assert len(dataset) == 22 and dataset.manifest["skipped"] == ["item 4"]
    assert torch.equal(stacked(dataset, range(4, 22))[0], images[5:])


def test_kill_between_flush_and_commit_resumes(tmp_path, monkeypatch):
    images, labels = random_set(10)
    pack_arrays(images, labels, tmp_path / "whole", CLASSES, "random")
    write_json = packed._write_json_atomic
    calls = []

    def dies_on_third_commit(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write_json(path, data)

    monkeypatch.setattr(packed, "_write_json_atomic", dies_on_third_commit)
    with pytest.raises(KeyboardInterrupt):
        pack_images(packed._ArraySource(images.permute(0, 2, 3, 1).numpy(), labels.numpy()), tmp_path / "resumed",
                    8, CLASSES, chunk_size=4, source_name="random",
                    source_hash=json.loads((tmp_path / "whole" / packed.MANIFEST).read_text())["source_hash"])
    monkeypatch.undo()
    assert json.loads((tmp_path / "resumed" / packed.PROGRESS).read_text())["written"] == 4
    pack_arrays(images, labels, tmp_path / "resumed", CLASSES, "random")
    assert pack_files(tmp_path / "resumed") == pack_files(tmp_path / "whole")


def test_finished_pack_is_kept_unless_overwrite(pack, tmp_path):
    before = pack_files(pack)
    other = random_set(seed=1)
    with pytest.raises(ValueError, match="already holds a finished pack; pass --overwrite"):
        pack_arrays(*other, pack, CLASSES, "other")
    assert pack_files(pack) == before
    pack_arrays(*other, pack, CLASSES, "other", overwrite=True)
    assert torch.equal(stacked(PackedDataset(pack), range(20))[0], other[0])
    assert sorted(tmp_path.iterdir()) == [pack]


def folder_bytes(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name: bytes)."""
    return {str(file.relative_to(path)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


class ArrayItems(packed._ArraySource):
    """Random-access (image, label) items that raise `error` when item `fail_at` is read; `read` lists the reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, fail_at: int | None = None,
                 error: BaseException | None = None):
        super().__init__(images.permute(0, 2, 3, 1).numpy(), labels.numpy())
        self.fail_at, self.error, self.read = fail_at, error, []

    def __getitem__(self, index: int):
        if index == self.fail_at:
            raise self.error
        self.read.append(index)
        return super().__getitem__(index)


def overwrite(source: ArrayItems, dst: Path) -> dict:
    return pack_images(source, dst, 8, CLASSES, source_name="new", source_hash="new", chunk_size=4, overwrite=True)


@pytest.mark.parametrize("failure", ["source error", "ctrl-c", "disk full"])
def test_a_failed_overwrite_keeps_the_old_pack_and_resumes(pack, tmp_path, monkeypatch, failure):
    (pack / packed.TARGET_CACHES / "encoder").mkdir(parents=True)
    (pack / packed.TARGET_CACHES / "encoder" / "targets.bin").write_bytes(b"features of the old images")
    before = folder_bytes(pack)
    images, labels = random_set(seed=1)
    error = {"source error": RuntimeError("unreadable"), "ctrl-c": KeyboardInterrupt(),
             "disk full": OSError(errno.ENOSPC, "No space left on device")}[failure]
    failing = ArrayItems(images, labels, fail_at=9, error=error)
    if failure == "disk full":
        failing.fail_at, write_json, commits = None, packed._write_json_atomic, []

        def disk_fills(path, data):
            commits.append(path)
            if len(commits) == 3:  # the start record and one chunk's are written
                raise error
            write_json(path, data)

        monkeypatch.setattr(packed, "_write_json_atomic", disk_fills)
    with pytest.raises(type(error)):
        overwrite(failing, pack)
    monkeypatch.undo()
    assert folder_bytes(pack) == before
    assert torch.equal(stacked(PackedDataset(pack, verify_checksum=True), range(20))[0], random_set()[0])
    progress = json.loads((tmp_path / "pack.partial" / packed.PROGRESS).read_text())
    assert progress["written"] == {"disk full": 4}.get(failure, 8)

    resumed = ArrayItems(images, labels)
    manifest = overwrite(resumed, pack)
    assert resumed.read == list(range(progress["next"], 20))  # continued, not started again
    assert sorted(tmp_path.iterdir()) == [pack]
    assert sorted(p.name for p in pack.iterdir()) == [packed.IMAGES, packed.LABELS, packed.MANIFEST]  # old caches gone
    dataset = PackedDataset(pack, verify_checksum=True)
    assert dataset.manifest == manifest and manifest["source"] == "new"
    assert torch.equal(stacked(dataset, range(20))[0], images)


def test_an_unfinished_overwrite_of_another_source_is_started_again(pack, tmp_path):
    images, labels = random_set(seed=1)
    with pytest.raises(RuntimeError):
        overwrite(ArrayItems(images, labels, fail_at=9, error=RuntimeError("unreadable")), pack)
    other = random_set(seed=2)
    pack_arrays(*other, pack, CLASSES, "other", overwrite=True)
    assert torch.equal(stacked(PackedDataset(pack, verify_checksum=True), range(20))[0], other[0])
    assert sorted(tmp_path.iterdir()) == [pack]


def test_an_overwrite_stopped_at_its_swap_is_finished_without_packing_again(pack, tmp_path, monkeypatch):
    before = folder_bytes(pack)
    images, labels = random_set(seed=1)
    partial = tmp_path / "pack.partial"
    rename, renames = os.rename, []

    def second_rename_fails(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        overwrite(ArrayItems(images, labels), pack)
    monkeypatch.undo()
    assert renames[0] == (pack, partial / packed.REPLACED)
    assert folder_bytes(pack) == before  # the first rename was undone at once
    assert PackedDataset(partial).manifest["source"] == "new"  # finished, not swapped in

    os.rename(pack, partial / packed.REPLACED)  # as if killed between the two renames: no pack folder
    with pytest.raises(ValueError, match=r"pack.partial holds an unfinished --overwrite of .*pack: run with "
                                         r"--overwrite to continue it"):
        pack_arrays(images, labels, pack, CLASSES, "other")
    assert folder_bytes(pack) == before  # any pack command puts the old pack back first

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    again = ArrayItems(images, labels)
    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        overwrite(again, pack)  # swapped in, then stopped while deleting the old pack
    monkeypatch.undo()
    assert again.read == []  # finished already: only swapped in
    assert (pack / packed.REPLACED).is_dir() and not partial.exists()
    assert torch.equal(stacked(PackedDataset(pack), range(20))[0], images)
    with pytest.raises(ValueError, match="already holds a finished pack"):
        pack_arrays(images, labels, pack, CLASSES, "other")
    assert sorted(p.name for p in pack.iterdir()) == [packed.IMAGES, packed.LABELS, packed.MANIFEST]


def test_overwrite_refuses_to_delete_what_is_not_a_pack(pack, tmp_path):
    other = random_set(seed=1)
    (pack / "notes.txt").write_text("mine")
    before = folder_bytes(pack)
    with pytest.raises(ValueError, match="pack holds notes.txt besides a pack, and --overwrite replaces the whole "
                                         "folder: move them out first"):
        pack_arrays(*other, pack, CLASSES, "other", overwrite=True)
    assert folder_bytes(pack) == before and sorted(tmp_path.iterdir()) == [pack]
    os.symlink(pack, tmp_path / "link")
    with pytest.raises(ValueError, match="link is a symbolic link: pass the folder it points to"):
        pack_arrays(*other, tmp_path / "link", CLASSES, "other", overwrite=True)
    (tmp_path / "file").write_text("mine")
    for replace in (False, True):
        with pytest.raises(ValueError, match="file exists and is not a folder"):
            pack_arrays(*other, tmp_path / "file", CLASSES, "other", overwrite=replace)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / packed.IMAGES).write_bytes(b"mine")
    with pytest.raises(ValueError, match="stray holds pack data files without progress.json or manifest.json"):
        pack_arrays(*other, tmp_path / "stray", CLASSES, "other")
    assert (tmp_path / "file").read_text() == (tmp_path / "stray" / packed.IMAGES).read_text() == "mine"
    (pack / "notes.txt").unlink()
    pack_arrays(*other, pack, CLASSES, "other", overwrite=True)  # without it, the pack is replaced
    assert len(PackedDataset(pack)) == 20 and sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "pack",
                                                                                             "stray"]


def test_bad_items_are_refused(tmp_path):
    images, labels = random_set(4)
    with pytest.raises(ValueError, match="labels before source item 4 fall outside 0..1"):
        pack_arrays(images, labels + 1, tmp_path / "a", ["x", "y"], "random")
    with pytest.raises(ValueError, match="source item 0: expected a uint8 image of 8x8x3"):
        pack_images([(images[0].float(), 0)], tmp_path / "b", 8, CLASSES)


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """3 classes of small images in several modes and sizes, a zero-byte file and a truncated JPEG."""
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (12 + 3 * i, 17 + c, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L" if i == 1 else "RGB")
            image.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    data = (root / "fox" / "0.jpg").read_bytes()
    (root / "fox" / "cut.jpg").write_bytes(data[:len(data) // 2])
    return root


def test_folder_pack_parallel_equals_serial_and_the_folder_dataset(image_tree, tmp_path):
    serial = pack_folder(image_tree, tmp_path / "serial", 8, workers=1)
    pack_folder(image_tree, tmp_path / "parallel", 8, workers=2)
    assert pack_files(tmp_path / "serial") == pack_files(tmp_path / "parallel")
    assert serial["count"] == 12 and serial["class_names"] == CLASSES
    assert [item.split(":")[0] for item in serial["skipped"]] == [str(image_tree / "dog" / "empty.jpg"),
                                                                  str(image_tree / "fox" / "cut.jpg")]
    folder = ImageFolderDataset(image_tree, 8, hflip=True, seed=5)
    folder.samples = [s for s in folder.samples if s[0].name != "cut.jpg"]  # left out of the pack when decoded
    dataset = PackedDataset(tmp_path / "serial", hflip=True, seed=5)
    for index in range(12):
        image, label = dataset[(index, 2)]
        expected, expected_label = folder[(index, 2)]
        assert torch.equal(image, expected) and label == expected_label


def test_cli_pack_and_info(image_tree, tmp_path, capsys):
    dst = tmp_path / "pack"
    assert main(["data", "pack", str(image_tree), str(dst), "--size", "8", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "12 x 8x8x3 uint8" in out and "skipped       2" in out and "cut.jpg" in out
    assert main(["data", "pack", str(image_tree), str(dst), "--size", "8"]) == 2
    assert "already holds a finished pack; pass --overwrite" in capsys.readouterr().err
    assert main(["data", "info", str(dst), "--verify"]) == 0
    assert "SHA-256 ok" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "not a pixelrepa pack" in capsys.readouterr().err


def test_cli_prepare_mnist(tmp_path, capsys):
    try:
        find_idx_dir("mnist")
    except FileNotFoundError:
        pytest.skip("MNIST is not installed")
    dst = tmp_path / "mnist"
    assert main(["data", "prepare", "mnist", str(dst), "--split", "test", "--limit", "64"]) == 0
    assert "64 x 32x32x3 uint8" in capsys.readouterr().out
    dataset = PackedDataset(dst, expected_size=32, num_classes=10)
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10 and torch.equal(image[0], image[2])
    assert main(["data", "info", str(dst)]) == 0
    assert "mnist test (first 64)" in capsys.readouterr().out


def test_a_folder_named_like_an_image_and_a_symlink_loop_are_listed_in_the_manifest(image_tree, tmp_path):
    (image_tree / "cat" / "a.png").mkdir()
    os.symlink("loop", image_tree / "dog" / "loop")
    manifest = pack_folder(image_tree, tmp_path / "pack", 8)
    assert manifest["count"] == 12
    assert f"{image_tree / 'cat' / 'a.png'}: a folder, not an image file" in "\n".join(manifest["skipped"])
    assert f"{image_tree / 'dog' / 'loop'}: a symlink loop" in manifest["skipped"]
    assert json.loads((tmp_path / "pack" / "manifest.json").read_text())["skipped"] == manifest["skipped"]
    assert len(PackedDataset(tmp_path / "pack")) == 12


def test_idx_subset_is_a_seeded_draw_packed_once(tmp_path):
    from pixelrepa.data.idx import idx_subset_order, load_idx_dataset, pack_idx_subset
    try:
        find_idx_dir("mnist")
    except FileNotFoundError:
        pytest.skip("MNIST is not installed")
    order = idx_subset_order(60_000, 50, 3, "mnist")
    assert torch.equal(order, torch.randperm(60_000, generator=torch.Generator().manual_seed(3))[:50])
    pack = pack_idx_subset("mnist", 50, 3, tmp_path / "pack")
    images, labels, _ = load_idx_dataset("mnist")
    dataset = PackedDataset(pack, expected_size=32, num_classes=10)
    assert len(dataset) == 50
    assert all(torch.equal(dataset[i][0], images[order[i]]) and dataset[i][1] == labels[order[i]] for i in (0, 17, 49))
    stamp = (pack / "images.u8").stat().st_mtime_ns
    assert pack_idx_subset("mnist", 50, 3, pack) == pack and (pack / "images.u8").stat().st_mtime_ns == stamp
    for bad in (0, 60_001):
        with pytest.raises(ValueError, match=f"{bad} images asked of the 60000 in the mnist train split"):
            pack_idx_subset("mnist", bad, 3, tmp_path / f"bad{bad}")
