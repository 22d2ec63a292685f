"""The training data set named by `config.data.source`, checked before training starts.

- a pack folder (has manifest.json): memory-mapped, refused if its size or class count does
  not fit the model;
- 'mnist' / 'fashion-mnist': the installed IDX files, packed once into OUT/data/ (rank 0;
  the other ranks wait) and then read as a pack;
- any other folder: ImageNet layout, decoded with the ADM centre crop on the fly.
The class names are saved with the run (OUT/classes.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as torch_dist
from torch.utils.data import Dataset

from pixelrepa.config import RunConfig
from pixelrepa.data.folder import ImageFolderDataset, check_num_classes
from pixelrepa.data.idx import load_idx_dataset
from pixelrepa.data.packed import MANIFEST, PackedDataset, pack_arrays
from pixelrepa.distributed import World

IDX_SETS = ("mnist", "fashion-mnist")


def build_dataset(config: RunConfig, out_dir: Path, world: World) -> Dataset:
    source, size = config.data.source, config.model.input_size
    if not source:
        raise ValueError("no training data: set data.source to a pack folder, an image folder, "
                         "or one of " + ", ".join(IDX_SETS))
    if source in IDX_SETS:
        pack = out_dir / "data" / f"{source}-{size}"
        if world.is_main and not (pack / MANIFEST).is_file():
            images, labels, classes = load_idx_dataset(source, "train", size)
            pack_arrays(images, labels, pack, classes, source=source)
        if world.world_size > 1:
            torch_dist.barrier()
        source = str(pack)
    path = Path(source)
    if (path / MANIFEST).is_file():
        dataset = PackedDataset(path, hflip=config.data.hflip, seed=config.train.seed, expected_size=size,
                                num_classes=config.model.num_classes)
        classes = list(dataset.class_names)
    elif path.is_dir():
        dataset = ImageFolderDataset(path, size, hflip=config.data.hflip, seed=config.train.seed,
                                     allow_empty_classes=config.data.allow_empty_classes)
        check_num_classes(dataset, config.model.num_classes)
        classes = list(dataset.classes)
    else:
        raise FileNotFoundError(f"data.source {source!r} is neither a folder nor one of {', '.join(IDX_SETS)}")
    if len(dataset) == 0:
        raise ValueError(f"data set {source} is empty")
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "classes.json").write_text(json.dumps(classes, indent=1))
    return dataset
