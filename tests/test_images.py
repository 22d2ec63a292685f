"""`save_labelled_grid`: the tiles, padding and row labels of the PNG, pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrepa.images import save_labelled_grid


def read(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


@pytest.mark.parametrize("rows, cols, scale, pad, label_width", [(2, 3, 2, 2, 90), (3, 4, 3, 1, 40), (1, 1, 2, 2, 90)])
def test_tiles_sit_in_rows_with_white_padding_and_labels(tmp_path, rows, cols, scale, pad, label_width):
    images = torch.randint(0, 200, (rows * cols, 3, 8, 6), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)  # under 200: never the white of the padding
    path = save_labelled_grid(images, [f"class {r}" for r in range(rows)], tmp_path / "grid.png", scale=scale,
                              pad=pad, label_width=label_width)
    grid = read(path)
    h, w = 8 * scale, 6 * scale
    assert grid.shape == (rows * (h + pad) + pad, label_width + cols * (w + pad) + pad, 3)
    white = np.ones(grid.shape[:2], dtype=bool)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        top, left = pad + r * (h + pad), label_width + pad + c * (w + pad)
        expected = image.permute(1, 2, 0).numpy().repeat(scale, axis=0).repeat(scale, axis=1)  # nearest
        np.testing.assert_array_equal(grid[top:top + h, left:left + w], expected)
        white[top:top + h, left:left + w] = False
    white[:, :label_width] = False
    assert (grid[white] == 255).all()  # the padding between and around the tiles
    for r in range(rows):  # each row's label is written in the strip on its left
        assert (grid[pad + r * (h + pad):(r + 1) * (h + pad), :label_width] < 128).any()
    assert (grid[:, :label_width] >= 128).mean() > 0.8


def test_rows_must_divide_the_images(tmp_path):
    images = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="5 images do not split into 2 rows"):
        save_labelled_grid(images, ["a", "b"], tmp_path / "grid.png")
    with pytest.raises(ValueError, match="into 0 rows"):
        save_labelled_grid(images, [], tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()
