"""Folder data sets, transforms and the loader: crop, colour policy, bad inputs, flips, sharding."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from pixelrepa.data.folder import ImageFolderDataset, check_num_classes
from pixelrepa.data.loader import make_loader
from pixelrepa.data.transforms import adm_center_crop, random_hflip, to_rgb

SIZE = 16


def _rgb(width=40, height=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _tree(root, counts: dict[str, int], ext=".png"):
    """root/CLASS/img_i.ext with distinct random pictures."""
    for c, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            _rgb(seed=100 * c + i).save(root / name / f"img_{i}{ext}")
    return root


def _manual_adm_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr, verbatim in numpy."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y = (arr.shape[0] - size) // 2
    crop_x = (arr.shape[1] - size) // 2
    return arr[crop_y:crop_y + size, crop_x:crop_x + size]


# ---- transforms ---------------------------------------------------------------------------

def test_adm_center_crop_matches_adm_on_large_image():
    image = _rgb(1000, 700)
    out = adm_center_crop(image, 64)
    assert out.size == (64, 64)
    np.testing.assert_array_equal(np.array(out), _manual_adm_crop(image, 64))
    # 1000x700 -> 500x350 -> 250x175 -> 125x87 (BOX), -> 92x64 (bicubic), crop x from 14
    halved = image
    for _ in range(3):
        halved = halved.resize((halved.width // 2, halved.height // 2), resample=Image.BOX)
    assert halved.size == (125, 87)
    resized = np.array(halved.resize((92, 64), resample=Image.BICUBIC))
    np.testing.assert_array_equal(np.array(out), resized[:, 14:78])


def test_adm_center_crop_upsamples_small_image():
    image = _rgb(50, 40)
    out = adm_center_crop(image, 64)
    assert out.size == (64, 64)
    expected = np.array(image.resize((80, 64), resample=Image.BICUBIC))[:, 8:72]
    np.testing.assert_array_equal(np.array(out), expected)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "1"])
def test_to_rgb_plain_modes_follow_convert_rgb(mode):
    image = _rgb().convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    np.testing.assert_array_equal(np.array(out), np.array(image.convert("RGB")))


def test_to_rgb_drops_alpha_without_compositing():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under fully transparent pixels stays red (not black, not white)
    out = np.array(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_to_rgb_palette_with_byte_transparency_has_no_warning(recwarn):
    image = Image.new("P", (4, 4))
    image.putpalette([10, 20, 30] * 256)
    image.info["transparency"] = bytes([0, 128])
    out = to_rgb(image)
    assert not recwarn.list
    assert out.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "int32"])
def test_to_rgb_sixteen_bit_is_scaled_not_clipped(dtype):
    values = np.array([[0, 257, 257 * 100, 65535]])
    image = Image.fromarray(values.astype(dtype))
    assert image.mode in ("I;16", "I;16B", "I")
    out = np.array(to_rgb(image))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 100, 255])
    assert (out == out[..., :1]).all()


def test_to_rgb_float_unit_and_byte_ranges():
    unit = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.array(to_rgb(unit))[0, :, 0], [0, 0, 128, 255])
    byte = Image.fromarray(np.array([[0.0, 100.4, 255.0, 300.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.array(to_rgb(byte))[0, :, 0], [0, 100, 255, 255])


def test_random_hflip_image_and_batch_reproducible():
    batch = torch.arange(64 * 2 * 3, dtype=torch.uint8).reshape(64, 1, 2, 3)
    a = random_hflip(batch, torch.Generator().manual_seed(1))
    b = random_hflip(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.uint8
    flipped = (a != batch).flatten(1).any(1)
    assert 0 < flipped.sum() < 64  # per-image draws
    assert torch.equal(a[flipped], batch[flipped].flip(-1))
    image = batch[0]
    outcomes = {random_hflip(image, torch.Generator().manual_seed(s)).equal(image) for s in range(20)}
    assert outcomes == {True, False}


# ---- folder layout -------------------------------------------------------------------------

def test_class_index_from_sorted_folder_names(tmp_path):
    _tree(tmp_path, {"n02": 2, "n01": 1, "b": 1})
    ds = ImageFolderDataset(tmp_path, SIZE, hflip=False)
    assert ds.classes == ["b", "n01", "n02"]
    assert [(p.parent.name, label) for p, label in ds.samples] == [("b", 0), ("n01", 1), ("n02", 2), ("n02", 2)]
    image, label = ds[3]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == 2


def test_class_names_order_and_exact_match(tmp_path):
    _tree(tmp_path, {"a": 1, "b": 1})
    ds = ImageFolderDataset(tmp_path, SIZE, class_names=["b", "a"])
    assert ds.class_to_idx == {"b": 0, "a": 1}
    with pytest.raises(ValueError, match=r"missing folders \['c'\], folders not in class_names \['b'\]"):
        ImageFolderDataset(tmp_path, SIZE, class_names=["a", "c"])


def test_any_image_extension_case_insensitive_others_ignored(tmp_path):
    (tmp_path / "c").mkdir()
    for i, ext in enumerate([".JPEG", ".jpg", ".Png", ".bmp", ".webp", ".tif", ".TIFF"]):
        _rgb(seed=i).save(tmp_path / "c" / f"x{i}{ext}")
    (tmp_path / "c" / "notes.txt").write_text("not an image")
    (tmp_path / "c" / "._x0.JPEG").write_bytes(b"macOS resource fork")
    ds = ImageFolderDataset(tmp_path, SIZE)
    assert len(ds) == 7 and ds.skipped == []


def test_flip_reproducible_per_seed_epoch_index(tmp_path):
    _tree(tmp_path, {"a": 8})
    ds = ImageFolderDataset(tmp_path, SIZE, seed=3)
    again = ImageFolderDataset(tmp_path, SIZE, seed=3)
    plain = ImageFolderDataset(tmp_path, SIZE, hflip=False)
    again.set_epoch(1)
    epoch0 = [ds[i][0] for i in range(8)]
    assert all(torch.equal(epoch0[i], again[(i, 0)][0]) for i in range(8))
    ds.set_epoch(1)
    epoch1 = [ds[i][0] for i in range(8)]
    assert all(torch.equal(epoch1[i], again[i][0]) for i in range(8))
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    for i in range(8):  # every item is the unflipped crop or its mirror
        assert torch.equal(epoch0[i], plain[i][0]) or torch.equal(epoch0[i], plain[i][0].flip(-1))


# ---- bad inputs: one test per case ---------------------------------------------------------

def test_corrupt_file_skipped_at_scan(tmp_path, caplog):
    _tree(tmp_path, {"a": 2})
    bad = tmp_path / "a" / "corrupt.png"
    bad.write_bytes((tmp_path / "a" / "img_0.png").read_bytes()[:200])  # truncated PNG: verify() fails
    with caplog.at_level(logging.WARNING, logger="pixelrepa.data"):
        ds = ImageFolderDataset(tmp_path, SIZE)
    assert len(ds) == 2 and [p for p, _ in ds.skipped] == [bad]
    assert str(bad) in caplog.text and "skipped 1 unreadable" in caplog.text


def test_text_file_with_image_extension_skipped_at_scan(tmp_path):
    _tree(tmp_path, {"a": 1})
    (tmp_path / "a" / "fake.jpg").write_text("this is text")
    ds = ImageFolderDataset(tmp_path, SIZE)
    assert len(ds) == 1 and ds.skipped[0][0].name == "fake.jpg" and "unreadable" in ds.skipped[0][1]


def test_zero_byte_file_skipped_at_scan(tmp_path):
    _tree(tmp_path, {"a": 1})
    (tmp_path / "a" / "empty.JPEG").touch()
    ds = ImageFolderDataset(tmp_path, SIZE)
    assert len(ds) == 1 and ds.skipped[0][0].name == "empty.JPEG"


def test_truncated_jpeg_replaced_by_next_index_at_load(tmp_path, caplog):
    _tree(tmp_path, {"a": 2}, ext=".jpg")
    full = (tmp_path / "a" / "img_0.jpg").read_bytes()
    (tmp_path / "a" / "img_0.jpg").write_bytes(full[:len(full) // 2])  # passes verify()
    ds = ImageFolderDataset(tmp_path, SIZE, hflip=False)
    assert len(ds) == 2 and ds.skipped == []
    with caplog.at_level(logging.WARNING, logger="pixelrepa.data"):
        image, label = ds[0]
    assert torch.equal(image, ds[1][0]) and label == 0
    assert [p.name for p, _ in ds.skipped] == ["img_0.jpg"] and "img_0.jpg" in caplog.text
    assert torch.equal(ds[0][0], image) and len(ds.skipped) == 1  # same replacement, recorded once


def test_unvalidated_bad_file_replaced_at_load(tmp_path):
    _tree(tmp_path, {"a": 2})
    (tmp_path / "a" / "img_1.png").write_text("garbage")
    ds = ImageFolderDataset(tmp_path, SIZE, hflip=False, validate=False)
    assert len(ds) == 2
    assert torch.equal(ds[1][0], ds[0][0])  # wraps around to index 0
    assert [p.name for p, _ in ds.skipped] == ["img_1.png"]


def test_non_rgb_modes_converted_and_counted(tmp_path):
    (tmp_path / "a").mkdir()
    base = _rgb()
    base.convert("L").save(tmp_path / "a" / "grey.png")
    base.convert("RGBA").save(tmp_path / "a" / "alpha.png")
    base.convert("P").save(tmp_path / "a" / "palette.png")
    base.convert("CMYK").save(tmp_path / "a" / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(tmp_path / "a" / "deep.png")
    ds = ImageFolderDataset(tmp_path, SIZE, hflip=False)
    assert ds.converted == {"L": 1, "RGBA": 1, "P": 1, "CMYK": 1, "I;16": 1}
    items = {p.name: ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    assert all(x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8 for x in items.values())
    assert (items["deep.png"] == 255).all()  # 16-bit white stays white


def test_small_image_upsampled_and_recorded(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    _rgb(10, 8).save(tmp_path / "a" / "tiny.png")
    _rgb(40, 30).save(tmp_path / "a" / "big.png")
    with caplog.at_level(logging.INFO, logger="pixelrepa.data"):
        ds = ImageFolderDataset(tmp_path, SIZE)
    assert [p.name for p in ds.upsampled] == ["tiny.png"] and "1 images are smaller" in caplog.text
    assert ds[1][0].shape == (3, SIZE, SIZE)


def test_empty_class_folder_is_an_error_unless_allowed(tmp_path, caplog):
    _tree(tmp_path, {"a": 1, "c": 1})
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"class folders hold no readable image: .*/b"):
        ImageFolderDataset(tmp_path, SIZE)
    with caplog.at_level(logging.WARNING, logger="pixelrepa.data"):
        ds = ImageFolderDataset(tmp_path, SIZE, allow_empty_classes=True)
    assert ds.classes == ["a", "b", "c"] and [label for _, label in ds.samples] == [0, 2]
    assert "empty class folders" in caplog.text


def test_empty_dataset_and_missing_root(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=f"no readable images under {tmp_path}"):
        ImageFolderDataset(tmp_path, SIZE)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing", SIZE)


def test_check_num_classes(tmp_path):
    _tree(tmp_path, {"a": 1, "b": 1})
    ds = ImageFolderDataset(tmp_path, SIZE)
    check_num_classes(ds, 2)
    with pytest.raises(ValueError, match=r"has 2 classes but the model has num_classes=1000"):
        check_num_classes(ds, 1000)


# ---- loader --------------------------------------------------------------------------------

def test_distributed_shards_are_disjoint():
    data = TensorDataset(torch.zeros(21, 3, 2, 2, dtype=torch.uint8), torch.arange(21))
    shards = []
    for rank in range(2):
        loader = make_loader(data, 5, num_workers=0, seed=0, rank=rank, world_size=2)
        loader.set_epoch(0)
        shards.append(torch.cat([labels for _, labels in loader]).tolist())
    assert len(shards[0]) == len(shards[1]) == 10  # 21 -> 10 per rank -> 2 full batches of 5
    assert not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="rank 2"):
        make_loader(data, 5, num_workers=0, seed=0, rank=2, world_size=2)


def test_folder_loader_batches_follow_epoch_in_persistent_workers(tmp_path):
    _tree(tmp_path, {"a": 4, "b": 4})
    ds = ImageFolderDataset(tmp_path, 8, seed=1)
    loader = make_loader(ds, 8, num_workers=1, seed=0)
    assert loader.persistent_workers and not loader.pin_memory
    by_epoch = {}
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        keys = list(loader.sampler)
        assert sorted(keys) == [(i, epoch) for i in range(8)]
        (images, labels), = list(loader)
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 8, 8) and labels.dtype == torch.int64
        assert torch.equal(images, torch.stack([ds[key][0] for key in keys]))  # the worker saw the epoch
        assert labels.tolist() == [ds.samples[i][1] for i, _ in keys]
        by_epoch[epoch] = torch.stack([ds[(i, epoch)][0] for i in range(8)])
    assert not torch.equal(by_epoch[0], by_epoch[1])


def test_empty_classes_reachable_from_the_run_config_and_the_pack_command(tmp_path):
    from pixelrepa.cli.main import main
    from pixelrepa.config import get_preset
    from pixelrepa.training.data import build_dataset
    from pixelrepa.distributed import World

    images = tmp_path / "images"
    _tree(images, {"a": 1, "c": 1})
    (images / "b").mkdir()
    config = get_preset("JiT-Micro/8").replace(**{"data.source": str(images), "model.num_classes": 3,
                                                  "model.input_size": SIZE, "model.patch_size": 8})
    cpu = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="--set data.allow_empty_classes=true"):
        build_dataset(config, tmp_path / "run", cpu)
    allowed = config.replace(**{"data.allow_empty_classes": "true"})
    assert len(build_dataset(allowed, tmp_path / "run", cpu)) == 2
    with pytest.raises(ValueError, match="--set model.num_classes=3"):
        build_dataset(allowed.replace(**{"model.num_classes": 10}), tmp_path / "run", cpu)
    assert main(["data", "pack", str(images), str(tmp_path / "pack"), "--size", str(SIZE)]) == 2
    assert main(["data", "pack", str(images), str(tmp_path / "pack"), "--size", str(SIZE),
                 "--allow-empty-classes"]) == 0


def test_a_folder_named_like_an_image_and_symlink_loops_are_recorded(tmp_path):
    _tree(tmp_path, {"a": 2, "b": 1})
    (tmp_path / "a" / "x.png").mkdir()
    (tmp_path / "a" / "x.png" / "inner.png").write_bytes(b"")
    os.symlink("loop", tmp_path / "a" / "loop")  # a link to itself, no image name
    os.symlink("y.jpg", tmp_path / "b" / "z.jpg")  # z.jpg -> y.jpg -> z.jpg
    os.symlink("z.jpg", tmp_path / "b" / "y.jpg")
    os.symlink("gone.png", tmp_path / "b" / "broken.png")
    os.symlink("root-loop", tmp_path / "root-loop")
    ds = ImageFolderDataset(tmp_path, SIZE, validate=False)
    assert len(ds) == 3 and ds.classes == ["a", "b"]
    reasons = {str(path.relative_to(tmp_path)): reason for path, reason in ds.skipped}
    assert reasons == {"root-loop": "a symlink loop (not a class folder)",
                       "a/loop": "a symlink loop",
                       "a/x.png": "a folder, not an image file (class folders are not searched recursively)",
                       "b/broken.png": "a broken link to gone.png",
                       "b/y.jpg": "a symlink loop", "b/z.jpg": "a symlink loop"}
