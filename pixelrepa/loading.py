"""One way to load a trained model: `load_model(path, ema=...)` for a model file, a folder
holding `model.safetensors` (a Hub folder from `pixelrepa export --hub` is one), a training
checkpoint folder, a run folder (its latest checkpoint) or a Hugging Face Hub id `org/name`.

A local path that exists always wins; otherwise `org/name` (optionally `org/name@revision`) is the
Hub repository whose `model.safetensors` `huggingface_hub` downloads into its cache, or finds
there with `HF_HUB_OFFLINE=1` (`locate_model`).

A model file holds one set of weights (`pixelrepa export` / `pixelrepa import`); a training
checkpoint holds the raw weights and every EMA, picked with `ema` (1-based, or "raw"; default
EMA 1). Every reader below is weights-only: no file pixelrepa reads can run code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pixelrepa import checkpoint as ckpt
from pixelrepa.align.heads import build_align_head
from pixelrepa.config import RunConfig
from pixelrepa.models.jit import JiT
from pixelrepa.extras import optional_import
from pixelrepa.weights import load_model_file

MODEL_FILE_NAME = "model.safetensors"
"""The model file inside a model folder."""

Ema = int | str | None
"""1-based EMA index, "raw" for the trained weights, or None (EMA 1 of a checkpoint; a model file's one set)."""


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
"""A Hugging Face Hub repository id, `org/name` or `org/name@revision`."""


def locate_model(path: str | Path) -> Path:
    """`path` itself if it exists; for a Hub id, the cached `model.safetensors` of that repository
    (downloaded first unless `HF_HUB_OFFLINE=1`)."""
    path = Path(path)
    text = str(path)
    if path.exists() or not HUB_ID.fullmatch(text):
        return path
    try:
        hub = require_huggingface_hub()
    except ImportError as err:
        raise FileNotFoundError(f"no local path {text}; as a Hugging Face Hub id: {err}") from None
    repo_id, _, revision = text.partition("@")
    try:
        return Path(hub.hf_hub_download(repo_id, MODEL_FILE_NAME, revision=revision or None))
    except (hub.errors.EntryNotFoundError, hub.errors.HFValidationError, OSError) as err:  # HTTP errors are OSErrors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"no local path {text}, and as a Hugging Face Hub id it gives no {MODEL_FILE_NAME}: "
                                f"{reason} (offline: only ids already in the Hub cache load)") from None


def require_huggingface_hub():
    """The `huggingface_hub` module (with its `errors`), or `MissingExtra` saying how to install it."""
    hub = optional_import("huggingface_hub", "hub", "Hugging Face Hub ids and `export --hub`")
    optional_import("huggingface_hub.errors", "hub", "Hugging Face Hub ids and `export --hub`")
    return hub


class LoadedModel(NamedTuple):
    config: RunConfig
    net: JiT
    """The backbone, in eval mode, on the device asked for."""
    source: dict
    """Where the weights came from: kind, path, and weights / step or the file's provenance."""


def load_model(path: str | Path, ema: Ema = None, device: torch.device | str = "cpu") -> LoadedModel:
    """The configuration and the trained backbone of `path` (see the module docstring)."""
    config, state, source = load_backbone_state(path, ema)
    net = JiT(config.model)
    net.load_state_dict(state)
    return LoadedModel(config, net.to(device).eval(), source)


def is_model_file(path: str | Path) -> bool:
    """A model file, or a folder holding one (rather than a training run or checkpoint folder); a
    Hub id is one."""
    path = locate_model(path)
    return not path.is_dir() or (path / MODEL_FILE_NAME).is_file()


def load_backbone_state(path: str | Path, ema: Ema = None) -> tuple[RunConfig, dict[str, Tensor], dict]:
    """(config, full backbone state, source record) of `path`; `load_model` without building the network."""
    path = locate_model(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file or training run at {path}")
    if is_model_file(path):
        file = path / MODEL_FILE_NAME if path.is_dir() else path
        if ema is not None:
            raise ValueError(f"{file} is a model file with one set of weights: --ema picks the weights of a "
                             "training run folder; pass the run folder, or leave --ema out")
        config, groups, metadata = load_model_file(file)
        if "net" not in groups:
            raise ValueError(f"{file} holds no backbone ('net' group), only: {', '.join(groups)}")
        provenance = {k[len("provenance."):]: v for k, v in metadata.items() if k.startswith("provenance.")}
        return config, groups["net"], {"kind": "model file", "path": str(file.resolve()), "provenance": provenance}
    folder = ckpt.find_checkpoint(path)
    if ema == "raw":
        loaded = ckpt.load_checkpoint(folder)
        model = ckpt.read_state(folder, ("model",))["model"]
        state = {key[len("net."):]: value for key, value in model.items() if key.startswith("net.")}
        config, step = loaded.config, loaded.step
    else:
        config, state, step = ckpt.backbone_with_ema(folder, 1 if ema is None else int(ema))
    weights = "raw" if ema == "raw" else f"ema{1 if ema is None else int(ema)}"
    return config, state, {"kind": "training checkpoint", "path": str(folder.resolve()), "weights": weights,
                           "step": step}


def load_head(path: str | Path, config: RunConfig) -> tuple[nn.Module | None, str]:
    """(the alignment head with its trained weights, its source) of a training run / checkpoint
    folder or a model file, or (None, why there is none). EMAs track the backbone alone, so the head
    is always the trained (raw) one."""
    if config.align.mode == "none":
        return None, "the run trained without alignment (align.mode none): there is no head"
    path = locate_model(path)
    if is_model_file(path):
        file = path / MODEL_FILE_NAME if path.is_dir() else path
        groups = load_model_file(file)[1]
        if "head" not in groups:
            return None, f"{file} holds no alignment head (a sampling export keeps the backbone only)"
        state, source = groups["head"], f"model file {file.resolve()}"
    else:
        folder = ckpt.find_checkpoint(path)
        model = ckpt.read_state(folder, ("model",))["model"]
        state = {key[len("head."):]: value for key, value in model.items() if key.startswith("head.")}
        source = f"training checkpoint {folder.resolve()} (trained weights)"
    head = build_align_head(config.model, config.align)
    head.load_state_dict(state)
    return head, source


def resolve_model_path(path: Path, ema: int = 1) -> Path:
    """A model file; the model file inside a folder; or, for a training run or checkpoint
    folder, its latest checkpoint's EMA backbone, exported once next to that checkpoint (a file
    whose digest names the weights a sample folder was made from). A Hub id: its cached model file."""
    path = locate_model(path)
    if not path.is_dir():
        return path
    if (path / MODEL_FILE_NAME).is_file():
        return path / MODEL_FILE_NAME
    try:
        checkpoint = ckpt.find_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds neither {MODEL_FILE_NAME} nor a training checkpoint (model files "
                                "come from `pixelrepa export` or `pixelrepa import`)") from None
    exported = checkpoint / f"sampling-ema{ema}.safetensors"
    if not exported.is_file():
        ckpt.export_sampling_checkpoint(checkpoint, exported, ema=ema)
    return exported
