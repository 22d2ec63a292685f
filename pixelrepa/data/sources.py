"""Labelled image sets in the forms people hold them, read as sources for the packer.

`pack_source(SRC, DST, size)` is `pixelrepa data pack`: it recognises SRC and hands its reader to
`packed.pack_images`, so every form gets the same ADM centre crop (`folder.load_image`), the same
parallel and resumable packing, and the same pack: the same images in the same order give
byte-identical `images.u8` and `labels.i64` whatever form they came in.

- An ImageNet-layout folder (`CLASS/IMAGE`): `packed.pack_folder`.
- A Hugging Face `datasets` folder written by `save_to_disk` (`state.json`, `dataset_info.json`,
  `*.arrow`; opened with `datasets.load_from_disk`), or parquet files (a `.parquet` file, a folder
  searched recursively, or a glob such as `data/train-*.parquet`; read by row group with
  pyarrow): rows in order, an image column (the `Image` feature, a {bytes, path} struct or plain
  bytes) and a label column (integers, or strings numbered in sorted order). Both columns are
  found from the features `datasets` stores (`Image`, `ClassLabel`) or by their names (`IMAGE_NAMES`,
  `LABEL_NAMES`), or are named with `image_column` / `label_column` (they must be where several
  columns qualify). Class names come from the `ClassLabel` feature when there is one.
- WebDataset tar shards (a `.tar` file, a folder of them or a glob such as `train-*.tar`; shards in
  sorted order, samples in tar order), as timm's `wds` reader expects them: the members of a sample
  share the key (the name up to the first dot of its base name), the image is its `jpg`, `jpeg`,
  `png` or `webp` member, the label the integer text of its `cls` member. Read with `tarfile`:
  the shards are indexed once (member offsets), then any sample is one seek. A shard without the
  tar end-of-archive marker (truncated) is refused.
- An EDM2 / REPA `dataset_tool.py` output, a zip or a folder: image files (sorted by their path
  inside it) and `dataset.json` with `{"labels": [[name, label], ...]}`.

A folder whose parquet files or shards belong to several splits (`train`, `validation`, `test` in
their names, as `datasets` reads them) is refused: pass one split's folder or a glob.

Class names of integer labels without names are "0" .. "K-1", K = the largest label + 1.

Bad input, as for folders: an image that does not decode, or an empty image cell of a table, is left
out, counted and named in the manifest's `skipped` (and the pack report). A sample without a label, a
label that is not a non-negative integer, or a shard's sample without an image stops the pack before
anything is written, with an error naming the shard (file) and the key (row or member name). The
`datasets` and parquet readers need the optional packages (`pip install 'pixelrepa[data]'`); a
missing one is named with that fix.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from torch import Tensor

from pixelrepa.data.folder import IMAGE_EXTENSIONS, load_image
from pixelrepa.data.packed import DECODE_ERRORS, SkippedItem, pack_folder, pack_images
from pixelrepa.extras import optional_import

IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
"""Column names taken as the image column when no `Image` feature says which it is."""
LABEL_NAMES = ("label", "labels", "cls", "class", "target")
"""Column names taken as the label column when no `ClassLabel` feature says which it is."""
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""WebDataset member extensions holding the image, in order of preference."""
WDS_LABEL_KEY = "cls"
EDM2_LABELS = "dataset.json"
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}
"""The words that name a split in file and folder names (those `datasets` looks for), by split."""
KINDS = {"datasets": "a Hugging Face datasets folder", "parquet": "parquet files", "webdataset": "WebDataset shards",
         "edm2": "an EDM2 / REPA data set", "folder": "an image folder"}
"""The forms `recognise` tells apart."""


def pack_source(src: str | Path, dst: str | Path, size: int, *, workers: int = 1, overwrite: bool = False,
                image_column: str | None = None, label_column: str | None = None,
                allow_empty_classes: bool = False) -> dict:
    """Pack any supported form of labelled images (module docstring); returns the manifest."""
    reader = open_source(src, size, image_column, label_column)
    if reader is None:
        return pack_folder(src, dst, size, workers=workers, overwrite=overwrite,
                           allow_empty_classes=allow_empty_classes)
    counts = np.bincount(reader.labels, minlength=len(reader.class_names))
    empty = [name for name, count in zip(reader.class_names, counts) if count == 0]
    if empty and not allow_empty_classes:
        raise ValueError(f"{src}: {len(empty)} of its {len(reader.class_names)} classes have no image "
                         f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); keep them as empty classes "
                         "(their indices stay) with --allow-empty-classes, or pack a source that has them")
    return pack_images(reader, dst, size, reader.class_names, workers=workers, source_name=reader.name,
                       source_hash=reader.source_hash, overwrite=overwrite)


def open_source(src: str | Path, size: int, image_column: str | None = None,
                label_column: str | None = None) -> "LabelledImages | None":
    """The reader of `src` giving `size`-px images, or None for an ImageNet-layout folder."""
    kind, files = recognise(src)
    if kind not in ("datasets", "parquet") and (image_column is not None or label_column is not None):
        raise ValueError(f"--image-column / --label-column name the columns of a `datasets` folder or parquet "
                         f"files; {src} is {KINDS[kind]}")
    name = str(Path(src).resolve())
    if kind == "datasets":
        return DatasetsFolder(files[0], size, image_column, label_column)
    if kind == "parquet":
        return ParquetRows(files, name, size, image_column, label_column)
    if kind == "webdataset":
        return WebDatasetShards(files, name, size)
    if kind == "edm2":
        return Edm2Images(files[0], size)
    return None


def recognise(src: str | Path) -> tuple[str, list[Path]]:
    """What `src` is (a key of `KINDS`) and its files. A path that exists is taken as it is, even
    with glob characters (`[`, `*`, `?`) in its name."""
    if not Path(src).exists() and glob.has_magic(str(src)):
        files = [Path(p) for p in sorted(glob.glob(str(src)))]
        suffixes = {p.suffix.lower() for p in files}
        if not files:
            raise FileNotFoundError(f"no file matches {src}")
        if suffixes == {".tar"}:
            return "webdataset", files
        if suffixes == {".parquet"}:
            return "parquet", files
        raise ValueError(f"{src} matches {', '.join(sorted(suffixes))} files; a pattern names .tar shards "
                         "or .parquet files, one kind")
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"no data set at {path}")
    if path.is_file():
        kinds = {".tar": "webdataset", ".parquet": "parquet", ".zip": "edm2"}
        if path.suffix.lower() not in kinds:
            raise ValueError(f"{path}: a data set file is a .tar shard, a .parquet file or an EDM2 .zip")
        return kinds[path.suffix.lower()], [path]
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(f"{path} holds a DatasetDict of splits ({', '.join(splits)}); pack one split's folder, "
                         f"e.g. {path / (splits[0] if splits else 'train')}")
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "datasets", [path]
    if (path / EDM2_LABELS).is_file():
        return "edm2", [path]
    shards = sorted(path.glob("*.tar"))
    if shards:
        return "webdataset", _one_split(path, shards, "WebDataset shards")
    tables = sorted(path.rglob("*.parquet"))
    if tables:
        return "parquet", _one_split(path, tables, "parquet files")
    return "folder", [path]


def _one_split(folder: Path, files: list[Path], what: str) -> list[Path]:
    """`files`, after refusing files of several splits: a split is named by a `SPLIT_WORDS` word
    between separators (`-._ `, digits, `/`) in the file's path inside `folder`, as `datasets` reads
    Hub repositories (`data/train-00000-of-00002.parquet`, `imagenet-val-000001.tar`)."""
    splits: dict[str, list[tuple[Path, int, str]]] = {}
    for file in files:
        parts = file.relative_to(folder).with_suffix("").parts
        for depth, part in enumerate(parts):
            words = set(re.split(r"[-._ 0-9]+", part.lower()))
            named = [(split, word) for split, names in SPLIT_WORDS.items() for word in names if word in words]
            if named:
                splits.setdefault(named[0][0], []).append((file, depth, named[0][1]))
                break
    if len(splits) < 2:
        return files
    counts = ", ".join(f"{split}: {len(found)} file{'s' * (len(found) > 1)}" for split, found in sorted(splits.items()))
    file, depth, word = splits["train" if "train" in splits else min(splits)][0]
    parts = file.relative_to(folder).parts
    example = folder.joinpath(*parts[:depth + 1]) if depth < len(parts) - 1 else file.parent / f"*{word}*{file.suffix}"
    raise ValueError(f"{folder} holds {what} of several splits ({counts}); pack one split: its folder or a glob "
                     f"naming its files, e.g. '{example}'")


class LabelledImages(ABC):
    """A random-access source for `pack_images`: item i is (uint8 (3, size, size), label), or raises
    `SkippedItem` for an image that does not decode. Subclasses read the encoded bytes of item i
    (`encoded`); they are picklable (worker processes open their files themselves)."""

    name: str
    """What the manifest records as the source."""
    labels: np.ndarray
    """int64 (N,): every label, read when the source is opened."""
    class_names: list[str]
    source_hash: str
    """Identifies the source's items, so a resumed pack refuses another source."""
    size: int
    """The side of the square images it gives."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        data, where = self.encoded(index)
        try:
            return load_image(io.BytesIO(data), self.size), int(self.labels[index])
        except DECODE_ERRORS as err:
            raise SkippedItem(f"{where}: failed to load: {err}") from None

    @abstractmethod
    def encoded(self, index: int) -> tuple[bytes, str]:
        """The encoded image of item `index` and where it is (shard and key), for messages."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part).encode())
    return digest.hexdigest()


def _numbered_names(labels: np.ndarray) -> list[str]:
    return [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []


# ---------------------------------------------------------------------------
# Tables: Hugging Face `datasets` folders and parquet files
# ---------------------------------------------------------------------------

def _choose_columns(schema, features: dict, where: str, image_column: str | None,
                    label_column: str | None) -> tuple[str, str, list[str] | None]:
    """(image column, label column, ClassLabel names or None) of a table, from `datasets`' features
    ({name: {"_type": ...}}), the arrow types and the column names, or as given."""
    import pyarrow as pa

    names = list(schema.names)

    def holds_images(name: str) -> bool:
        kind = schema.field(name).type
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or \
            (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)

    def pick(given, role, by_feature, by_name, usable):
        if given is not None:
            if given not in names:
                raise ValueError(f"{where} has no column {given!r} (columns: {', '.join(names)})")
            return given
        found = [n for n in names if by_feature(n)] or [n for n in by_name if n in names and usable(n)]
        if not found:
            raise ValueError(f"{where}: no {role} column found among {', '.join(names)}; name it with "
                             f"--{role}-column")
        if len(found) > 1:
            raise ValueError(f"{where}: several {role} columns ({', '.join(found)}); name one with --{role}-column")
        return found[0]

    image = pick(image_column, "image", lambda n: (features.get(n) or {}).get("_type") == "Image",
                 IMAGE_NAMES, holds_images)
    label = pick(label_column, "label", lambda n: (features.get(n) or {}).get("_type") == "ClassLabel",
                 LABEL_NAMES, lambda n: n != image)
    if not holds_images(image):
        raise ValueError(f"{where}: column {image!r} is {schema.field(image).type}, not encoded images "
                         "(binary, or a struct with 'bytes')")
    label_feature = features.get(label) or {}
    return image, label, label_feature.get("names") if label_feature.get("_type") == "ClassLabel" else None


def _labels_of(column, where: str, keys, class_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """int64 labels and class names from an arrow label column; `keys(i)` names row i in errors."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        first = int(pc.index(pc.is_null(column), True).as_py())
        raise ValueError(f"{where}: {keys(first)} has no label")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = np.asarray(column.to_pylist(), dtype=object)
        class_names = sorted(set(values))
        index = {name: k for k, name in enumerate(class_names)}
        return np.array([index[v] for v in values], dtype=np.int64), class_names
    if not pa.types.is_integer(column.type):
        raise ValueError(f"{where}: the label column is {column.type}, not integers or strings")
    labels = column.to_numpy().astype(np.int64)
    if len(labels) and labels.min() < 0:
        first = int(np.argmax(labels < 0))
        raise ValueError(f"{where}: {keys(first)} has label {labels[first]}; labels are class indices >= 0")
    if class_names is not None and len(labels) and labels.max() >= len(class_names):
        first = int(np.argmax(labels >= len(class_names)))
        raise ValueError(f"{where}: {keys(first)} has label {labels[first]}, beyond its {len(class_names)} "
                         "ClassLabel names")
    return labels, class_names if class_names is not None else _numbered_names(labels)


def _cell_bytes(value, where: str, base: Path) -> bytes:
    """The encoded image of an image cell: bytes, or a {bytes, path} struct (path relative to `base`)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            try:
                return (base / value["path"]).read_bytes()
            except OSError as err:
                raise SkippedItem(f"{where}: failed to load {value['path']}: {err.strerror}") from None
        raise SkippedItem(f"{where}: failed to load: the image cell holds neither bytes nor a path")
    if value is None:
        raise SkippedItem(f"{where}: failed to load: the image cell is empty")
    return value


class DatasetsFolder(LabelledImages):
    """A `datasets` folder written by `save_to_disk`, opened with `datasets.load_from_disk` (memory-mapped)."""

    def __init__(self, path: Path, size: int, image_column: str | None, label_column: str | None):
        datasets = optional_import("datasets", "data", "reading a Hugging Face datasets folder")
        self.path, self.name, self.size = path, str(path.resolve()), size
        self.dataset = datasets.load_from_disk(str(path))
        self.image_column, label, names = _choose_columns(self.dataset.data.schema, self.dataset.features.to_dict(),
                                                          str(path), image_column, label_column)
        self.labels, self.class_names = _labels_of(self.dataset.data.column(label), str(path),
                                                   lambda i: f"row {i}", names)
        self.source_hash = _digest("datasets", (path / "state.json").read_text(), self.image_column, label,
                                   self.labels)

    def encoded(self, index: int) -> tuple[bytes, str]:
        where = f"{self.path} row {index}"
        return _cell_bytes(self.dataset.data.column(self.image_column)[index].as_py(), where, self.path), where


class ParquetRows(LabelledImages):
    """Rows of parquet files in order; images read one row group at a time, the last one kept."""

    def __init__(self, files: list[Path], name: str, size: int, image_column: str | None,
                 label_column: str | None):
        pq = optional_import("pyarrow.parquet", "data", "reading parquet files")
        import pyarrow as pa

        self.files, self.name, self.size = files, name, size
        first = pq.ParquetFile(files[0])
        metadata = first.schema_arrow.metadata or {}
        features = json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {}) \
            if b"huggingface" in metadata else {}
        self.image_column, label, names = _choose_columns(first.schema_arrow, features, str(files[0]),
                                                          image_column, label_column)
        self.groups: list[tuple[int, int, int, int]] = []  # (first row, file, row group, its first row in the file)
        chunks, rows = [], 0
        for k, file in enumerate(files):
            meta = pq.ParquetFile(file).metadata
            in_file = 0
            for group in range(meta.num_row_groups):
                self.groups.append((rows, k, group, in_file))
                rows += meta.row_group(group).num_rows
                in_file += meta.row_group(group).num_rows
            chunks += pq.read_table(file, columns=[label]).column(label).chunks
        self.group_starts = np.array([g[0] for g in self.groups], dtype=np.int64)
        self.labels, self.class_names = _labels_of(pa.chunked_array(chunks), name, lambda i: self._locate(i)[2],
                                                   names)
        self.source_hash = _digest("parquet", [[str(f), f.stat().st_size] for f in files], self.image_column, label,
                                   self.labels)

    def _locate(self, index: int) -> tuple[int, int, str]:
        """(row group position, row within the group, where: file and row) of row `index`."""
        position = int(np.searchsorted(self.group_starts, index, side="right")) - 1
        start, file, _, file_row = self.groups[position]
        return position, index - start, f"{self.files[file]} row {file_row + index - start}"

    def encoded(self, index: int) -> tuple[bytes, str]:
        import pyarrow.parquet as pq

        position, offset, where = self._locate(index)
        _, file, group, _ = self.groups[position]
        cached = getattr(self, "_open_group", None)
        if cached is None or cached[0] != position:
            table = pq.ParquetFile(self.files[file]).read_row_group(group, columns=[self.image_column])
            cached = self._open_group = (position, table.column(self.image_column))
        return _cell_bytes(cached[1][offset].as_py(), where, self.files[file].parent), where


# ---------------------------------------------------------------------------
# WebDataset tar shards
# ---------------------------------------------------------------------------

_WDS_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")
"""A member name as WebDataset splits it: key (path up to the first dot of the base name), extension."""


class WebDatasetShards(LabelledImages):
    """Samples of tar shards, indexed once by member offsets (module docstring)."""

    def __init__(self, shards: list[Path], name: str, size: int):
        self.shards, self.name, self.size = [str(s) for s in shards], name, size
        self.places: list[tuple[int, int, int, str]] = []  # (shard, data offset, bytes, key)
        labels, listing = [], []
        for k, shard in enumerate(shards):
            for key, members, label_text in self._samples(shard):
                image = next((members[ext] for ext in WDS_IMAGE_KEYS if ext in members), None)
                if image is None:
                    raise ValueError(f"{shard}: sample {key!r} has no image (a {'/'.join(WDS_IMAGE_KEYS)} member)")
                if label_text is None:
                    raise ValueError(f"{shard}: sample {key!r} has no label (a {WDS_LABEL_KEY} member)")
                try:
                    label = int(label_text.strip())
                except ValueError:
                    raise ValueError(f"{shard}: sample {key!r} has the label {label_text[:20]!r}, not an integer") \
                        from None
                if label < 0:
                    raise ValueError(f"{shard}: sample {key!r} has label {label}; labels are class indices >= 0")
                self.places.append((k, *image, key))
                labels.append(label)
                listing.append([k, key, label])
        self.labels = np.array(labels, dtype=np.int64)
        self.class_names = _numbered_names(self.labels)
        self.source_hash = _digest("webdataset", [[s, os.path.getsize(s)] for s in self.shards], listing)

    @staticmethod
    def _samples(shard: Path) -> list[tuple[str, dict[str, tuple[int, int]], str | None]]:
        """(key, {extension: (data offset, bytes)}, cls text or None) per sample, in tar order.

        A shard cut at a member boundary reads as a shorter tar (`tarfile` stops at the missing
        header): the block after the last member must be the end-of-archive marker (zeros)."""
        samples, key, members, label, end = [], None, {}, None, 0
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    match = _WDS_NAME.match(member.name)
                    if not member.isfile() or match is None or os.path.basename(member.name).startswith("__"):
                        continue
                    if match[1] != key:
                        if key is not None:
                            samples.append((key, members, label))
                        key, members, label = match[1], {}, None
                    extension = match[2].lower()
                    members[extension] = (member.offset_data, member.size)
                    if extension == WDS_LABEL_KEY:
                        label = tar.extractfile(member).read().decode("utf-8", "replace")
        except tarfile.TarError as err:
            raise ValueError(f"{shard} is not a readable tar shard: {err}") from None
        with open(shard, "rb") as file:
            file.seek(end)
            if file.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise ValueError(f"{shard} ends after sample {key!r} without the tar end-of-archive marker: it is "
                                 "truncated; download or write it again")
        if key is not None:
            samples.append((key, members, label))
        return samples

    def encoded(self, index: int) -> tuple[bytes, str]:
        shard, offset, length, key = self.places[index]
        opened = getattr(self, "_open_shard", None)
        if opened is None or opened[0] != shard:  # items are read in order: one shard open at a time
            if opened is not None:
                opened[1].close()
            opened = self._open_shard = (shard, open(self.shards[shard], "rb"))
        handle = opened[1]
        handle.seek(offset)
        return handle.read(length), f"{self.shards[shard]} sample {key!r}"


# ---------------------------------------------------------------------------
# EDM2 / REPA dataset_tool output: a zip or folder with dataset.json
# ---------------------------------------------------------------------------

class Edm2Images(LabelledImages):
    """Image files of a zip or folder, sorted by path, labelled by its `dataset.json`."""

    def __init__(self, path: Path, size: int):
        self.path, self.name, self.size = path, str(path.resolve()), size
        if path.is_file():
            try:
                with zipfile.ZipFile(path) as archive:
                    names = archive.namelist()
                    text = archive.read(EDM2_LABELS).decode() if EDM2_LABELS in names else None
            except zipfile.BadZipFile as err:
                raise ValueError(f"{path} is not a readable zip: {err}") from None
        else:
            names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
            text = (path / EDM2_LABELS).read_text()
        if text is None:
            raise ValueError(f"{path} has no {EDM2_LABELS}: an EDM2 / REPA data set labels its images there")
        try:
            listed = json.loads(text).get("labels")
        except (ValueError, AttributeError):
            raise ValueError(f"{path}/{EDM2_LABELS} is not a JSON object with 'labels'") from None
        if listed is None:
            raise ValueError(f"{path}/{EDM2_LABELS} has \"labels\": null (an unconditional set); pixelrepa trains "
                             "class-conditional models and needs a label per image")
        if not isinstance(listed, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in listed):
            raise ValueError(f"{path}/{EDM2_LABELS}: 'labels' is not a list of [file name, label] pairs (EDM2's "
                             "dataset_tool.py format)")
        by_name = {str(name).replace("\\", "/"): label for name, label in listed}
        self.names = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not self.names:
            raise ValueError(f"{path} holds no image files")
        labels = []
        for name in self.names:
            label = by_name.get(name)
            if label is None:
                raise ValueError(f"{path}: {name} has no label in {EDM2_LABELS}")
            if not isinstance(label, int) or label < 0:
                raise ValueError(f"{path}: {name} has the label {label!r} in {EDM2_LABELS}; labels are class "
                                 "indices >= 0")
            labels.append(label)
        self.labels = np.array(labels, dtype=np.int64)
        self.class_names = _numbered_names(self.labels)
        self.source_hash = _digest("edm2", path.stat().st_size if path.is_file() else None, self.names, self.labels)

    def encoded(self, index: int) -> tuple[bytes, str]:
        name = self.names[index]
        where = f"{self.path}: {name}"
        if self.path.is_dir():
            return (self.path / name).read_bytes(), where
        if getattr(self, "_open_archive", None) is None:
            self._open_archive = zipfile.ZipFile(self.path)
        return self._open_archive.read(name), where
