"""Image files: single PNGs (written atomically, read, verified) and a labelled grid with one row per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from pixelrepa.files import atomic_write


def save_labelled_grid(images: Tensor, row_labels: list[str], path: str | Path, scale: int = 2,
                       label_width: int = 90, pad: int = 2) -> Path:
    """`labelled_grid` written to `path` as a PNG, atomically."""
    canvas = labelled_grid(images, row_labels, scale, label_width, pad)
    path = Path(path)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def labelled_grid(images: Tensor, row_labels: list[str], scale: int = 2, label_width: int = 90,
                  pad: int = 2) -> Image.Image:
    """images: uint8 (rows * cols, 3, H, W), row-major; one text label per row on the left.

    Tiles are enlarged `scale` times (nearest) and laid out `pad` white pixels apart and from the
    edges, right of a white strip `label_width` pixels wide that holds the labels."""
    rows = len(row_labels)
    if rows == 0 or len(images) % rows:
        raise ValueError(f"{len(images)} images do not split into {rows} rows")
    tiles = images.cpu().to(torch.uint8).repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    grid = make_grid(tiles, nrow=len(images) // rows, padding=pad, pad_value=255)
    border = pad if len(tiles) == 1 else 0  # make_grid returns a lone tile without its border
    grid = torch.nn.functional.pad(grid, (label_width + border, border, border, border), value=255)
    canvas = Image.fromarray(grid.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas)
    h = tiles.shape[-2]
    for r, label in enumerate(row_labels):
        draw.text((4, pad + r * (h + pad) + h // 2 - 6), label, fill="black")
    return canvas


def is_complete_png(path: Path) -> bool:
    """True when `path` exists and is a readable PNG."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SyntaxError):
        return False


def write_png(path: Path, image: Tensor) -> None:
    """uint8 (C, H, W) to PNG, atomically."""
    array = image.permute(1, 2, 0).numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def read_png(path: Path) -> np.ndarray:
    """uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))
