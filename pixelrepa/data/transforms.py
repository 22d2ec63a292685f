"""Image transforms: colour conversion, the ADM center crop, flips, and the model's range.

The pipeline follows JiT/ADM: decode, convert to RGB, center crop with `adm_center_crop`,
then an optional horizontal flip on the uint8 tensor. Images stay uint8 until
`to_model_range` maps the batch to [-1, 1]; `to_uint8` maps samples back.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def adm_center_crop(pil_image: Image.Image, size: int) -> Image.Image:
    """The ADM / JiT center crop to `size` x `size`.

    While the short side is at least 2 * size, halve both sides with a BOX filter (integer
    division); then resize with BICUBIC so the short side is `size` (each side rounded
    from side * size / short side); then cut the centered square (offset (side - size) // 2).
    Images smaller than `size` are upsampled by the bicubic step, as in ADM.
    """
    image = pil_image
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_rgb(pil_image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any image PIL decodes.

    Policy, per mode:
    - RGB: returned as is.
    - L, 1, CMYK, YCbCr, ... : PIL's `convert("RGB")` (no colour management), as JiT/ADM do.
    - RGBA, LA, PA: alpha is DROPPED, not composited: the stored colour under transparent
      pixels is kept, exactly what JiT/ADM's `convert("RGB")` gives.
    - P (palette): through RGBA when it carries transparency (same result as above, without
      PIL's warning about byte transparency), else straight to RGB.
    - 16-bit (I;16, I;16L, I;16B, I;16N) and 32-bit integer I (how PIL may open 16-bit
      PNGs): taken as 16-bit grey, scaled to 8 bits by dividing by 257 and rounding
      (65535 -> 255), values outside [0, 65535] clipped; PIL's own conversion would clip
      everything above 255 to white instead.
    - F (32-bit float): grey in [0, 1] scaled by 255 when its maximum is <= 1, otherwise
      taken as [0, 255]; clipped to that range, rounded; NaN reads as 0.
    Grey results are repeated to 3 channels. EXIF orientation is not applied (as in ADM/JiT).
    """
    mode = pil_image.mode
    if mode == "RGB":
        return pil_image
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.array(pil_image).astype(np.float64) / 257.0
        return _grey_to_rgb(grey)
    if mode == "F":
        grey = np.nan_to_num(np.array(pil_image, dtype=np.float64), nan=0.0)
        return _grey_to_rgb(grey * 255.0 if grey.max() <= 1.0 else grey)
    if mode == "P" and "transparency" in pil_image.info:
        pil_image = pil_image.convert("RGBA")
    return pil_image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """float grey values on the 0..255 scale -> clipped, rounded, 3-channel uint8 RGB."""
    grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey8[:, :, None], 3, axis=2))


def pil_to_uint8(pil_image: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(pil_image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror left-right with probability 1/2, drawn from `generator`.

    An image (C, H, W) takes one draw; a batch (N, C, H, W) takes N draws, one per image.
    Works on any dtype (uint8 in the data pipeline).
    """
    if x.ndim == 3:
        return x.flip(-1) if torch.rand((), generator=generator).item() < 0.5 else x
    if x.ndim == 4:
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    raise ValueError(f"random_hflip expects (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")


def to_model_range(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
