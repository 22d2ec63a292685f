"""Image files: single PNGs (written atomically, read, verified) and a labelled grid with one row per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from pixelrepa.files import atomic_write


def save_labelled_grid(images: Tensor, row_labels: list[str], path: str | Path, scale: int = 2,
                       label_width: int = 90, pad: int = 2) -> Path:
    """images: uint8 (rows * cols, 3, H, W), row-major; one text label per row on the left."""
    rows = len(row_labels)
    if rows == 0 or len(images) % rows:
        raise ValueError(f"{len(images)} images do not split into {rows} rows")
    cols = len(images) // rows
    h, w = images.shape[-2] * scale, images.shape[-1] * scale
    canvas = Image.new("RGB", (label_width + cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(row_labels):
        top = pad + r * (h + pad)
        draw.text((4, top + h // 2 - 6), label, fill="black")
        for c in range(cols):
            tile = images[r * cols + c].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
            tile_img = Image.fromarray(tile).resize((w, h), Image.NEAREST)
            canvas.paste(tile_img, (label_width + pad + c * (w + pad), top))
    path = Path(path)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


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
