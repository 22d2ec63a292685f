"""This project's model file: one safetensors file holding networks and their config.

Tensors are stored as `<group>.<key>` (groups: `net` for the backbone, `adapter` or
`projector` for an alignment head); the metadata holds the format tag, the full
`RunConfig` as JSON and free-form provenance. Writing goes through a temporary name and
an atomic rename, so an interrupted write never replaces a good file with a broken one.

An encoder file (`save_encoder_file`) holds a frozen target encoder's state under its timm
key names, with the timm name, image size and patch size it was built at in its metadata,
so that `align.encoder.weights` can be checked against the encoder config on loading.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pixelrepa.config import RunConfig
from pixelrepa.files import atomic_write

FORMAT = "pixelrepa-model/1"
ENCODER_FORMAT = "pixelrepa-encoder/1"


def save_model_file(path: str | Path, config: RunConfig, groups: dict[str, dict[str, Tensor]],
                    provenance: dict[str, str] | None = None) -> Path:
    path = Path(path)
    tensors = {f"{group}.{key}": value.detach().contiguous().cpu()
               for group, state in groups.items() for key, value in state.items()}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict()), "groups": ",".join(groups)}
    metadata.update({f"provenance.{k}": str(v) for k, v in (provenance or {}).items()})
    return _write_atomically(path, tensors, metadata)


def save_encoder_file(path: str | Path, state: dict[str, Tensor], name: str, img_size: int, patch_size: int,
                      provenance: dict[str, str] | None = None) -> Path:
    """A timm encoder's state dict, built as `name` at `img_size` px with patch `patch_size`."""
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    metadata = {"format": ENCODER_FORMAT, "encoder.name": name, "encoder.img_size": str(img_size),
                "encoder.patch_size": str(patch_size)}
    metadata.update({f"provenance.{k}": str(v) for k, v in (provenance or {}).items()})
    return _write_atomically(Path(path), tensors, metadata)


def encoder_file_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a file written by `save_encoder_file`; None for any other file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError):
        return None  # not safetensors: a plain torch state dict, checked by timm's loader alone
    return metadata if metadata.get("format") == ENCODER_FORMAT else None


def _write_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_model_file(path: str | Path) -> tuple[RunConfig, dict[str, dict[str, Tensor]], dict[str, str]]:
    """(config, {group: state_dict}, metadata) from a file written by `save_model_file`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pixelrepa model file (format tag {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    groups: dict[str, dict[str, Tensor]] = {g: {} for g in metadata["groups"].split(",") if g}
    for name, value in tensors.items():
        group, key = name.split(".", 1)
        groups.setdefault(group, {})[key] = value
    return RunConfig.from_dict(json.loads(metadata["config"])), groups, metadata
