"""This project's model file: one safetensors file holding networks and their config.

Tensors are stored as `<group>.<key>` (groups: `net` for the backbone, `adapter` or
`projector` for an alignment head); the metadata holds the format tag, the full
`RunConfig` as JSON and free-form provenance. Writing goes through a temporary name and
an atomic rename, so an interrupted write never replaces a good file with a broken one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pixelrepa.config import RunConfig

FORMAT = "pixelrepa-model/1"


def save_model_file(path: str | Path, config: RunConfig, groups: dict[str, dict[str, Tensor]],
                    provenance: dict[str, str] | None = None) -> Path:
    path = Path(path)
    tensors = {f"{group}.{key}": value.detach().contiguous().cpu()
               for group, state in groups.items() for key, value in state.items()}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict()), "groups": ",".join(groups)}
    metadata.update({f"provenance.{k}": str(v) for k, v in (provenance or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
