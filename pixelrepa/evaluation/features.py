"""Feature networks for the sample-quality metrics, and feature extraction split across ranks.

`build_feature_extractor(spec, device, encoder_weights)` gives the network that maps uint8
(N, 3, H, W) batches to `((N, D) float features,)`, the form `metrics.extract_features` expects,
together with a record that names it (`describe`, whose `id` tells networks apart):

* ``inception`` (default): the offline FID Inception-v3 (`evaluation.inception`), 2048-d.
* ``encoder:NAME``: a representation encoder preset (`config.ENCODER_PRESETS`: 'dinov2-b',
  'efficientnet-lite0', ...) through `align.encoders.build_encoder`, with `encoder_weights`
  a local weights file (needed offline for DINOv2; Lite0 ships with its package). The feature of
  an image is the **mean of its patch tokens**: `TargetEncoder(x, grid=<the encoder's own grid>)`
  averaged over the tokens, with x = uint8 / 127.5 - 1 in [-1, 1] (the encoder resizes it to its
  own resolution). FD_DINOv2 in the literature (Stein et al. 2023) uses DINOv2's pooled CLS
  output instead; `TargetEncoder` drops all prefix tokens, so this FD is on mean-pooled patch
  tokens and is not numerically the published FD_DINOv2.

The Inception Score needs torch-fidelity's classifier (`inception.find_classifier_weights`), not
the feature network: `resolve_classifier` finds and checks its weights, and `WithClassifier` runs
the feature network and the classifier on each batch, so the images are read (or sampled) once.
`weights_by_metric` says which network and weights file produced each metric.

`extract_features_distributed(source, extractor, batch_size, world)`: under torchrun each
rank takes a contiguous slice of the images (rank r: images [r N / W, (r + 1) N / W)), and the
features are gathered to rank 0 in the original image order; other ranks get None. With a single
process it is `metrics.extract_features` unchanged.
"""

from __future__ import annotations

import dataclasses
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from pixelrepa.evaluation import inception
from pixelrepa.evaluation.metrics import PR_NEIGHBORHOOD, ImageBatches, ImageSource, extract_features
from pixelrepa.files import file_digest

INCEPTION = "inception"
ENCODER_PREFIX = "encoder:"
POOLING = "mean of patch tokens"


# ---------------------------------------------------------------------------
# Feature networks
# ---------------------------------------------------------------------------

class EncoderFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> ((N, C),): the mean of a `TargetEncoder`'s patch tokens on its own grid."""

    def __init__(self, encoder: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid = tuple(grid)
        self.feature_dim = encoder.feature_dim

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor]:
        x = images.float() / 127.5 - 1.0
        return (self.encoder(x, grid=self.grid).mean(dim=1),)


class InceptionFeatures(nn.Module):
    """The offline FID Inception-v3 as a feature network: uint8 (N, 3, H, W) -> ((N, 2048),)."""

    feature_dim = inception.FEATURE_DIM

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> tuple[Tensor]:
        return (self.network(images)[0],)


class WithClassifier(nn.Module):
    """A feature network and the Inception Score classifier in one pass over each batch:
    uint8 (N, 3, H, W) -> ((N, D + 1008),), the D features first; `split` separates them again."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features, self.classifier = features, classifier
        self.feature_dim = features.feature_dim

    def forward(self, images: Tensor) -> tuple[Tensor]:
        return (torch.cat([self.features(images)[0].float(), self.classifier(images)[0].float()], dim=1),)

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D + 1008) -> features (N, D), logits (N, 1008)."""
        return rows[:, :self.feature_dim], rows[:, self.feature_dim:]


def resolve_classifier(metrics: list[str], weights: str | Path | None) -> tuple[Path, str] | None:
    """The Inception Score's weights file and how it was found, when `metrics` asks for 'is' and one is
    present (`inception.find_classifier_weights`; raises for an unusable file); None otherwise.
    `weights` without 'is' in `metrics` is a usage error."""
    if "is" not in metrics:
        if weights is not None:
            raise ValueError(f"{inception.FOUND_BY_FLAG} is the classifier of the Inception Score: add `is` to "
                             "--metrics, or leave the option out")
        return None
    return inception.find_classifier_weights(weights)


def build_classifier(found: tuple[Path, str], device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """torch-fidelity's Inception-v3 with the found weights (uint8 -> ((N, 1008) logits,)) and its record."""
    path, found_by = found
    return inception.load_classifier(path, device), inception.describe_classifier(path, found_by)


def weights_by_metric(metrics: list[str], network: dict, classifier: dict | None) -> dict:
    """metric -> the network and weights file that produced its number ('is' only when computed)."""
    converted = network.get("converted_weights")
    feature_weights = {"network": network.get("id", INCEPTION), "weights": converted or network.get("weights_source")}
    if converted:
        feature_weights["converted_from"] = network.get("weights_source")
    if network.get("weights_sha256"):
        feature_weights["sha256"] = network["weights_sha256"]
    out = {m: feature_weights for m in metrics if m != "is"}
    if "is" in metrics and classifier is not None:
        out["is"] = {"network": f"{inception.EXTRACTOR_NAME} classifier", "weights": classifier["weights"],
                     "sha256": classifier["sha256"], "found_by": classifier["found_by"]}
    return out


def unpublished_note(classifier: dict) -> str:
    """The warning for Inception Score weights that are not torch-fidelity's published file."""
    return (f"the Inception Score weights {classifier['weights']} are not torch-fidelity's published file (SHA-256 "
            f"{classifier['sha256'][:8]}..., not {inception.PUBLISHED_SHA256_PREFIX}...): the score is not "
            "comparable with published ones")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'inception' -> ('inception', None); 'encoder:NAME' -> ('encoder', NAME), NAME a known preset."""
    from pixelrepa.config import ENCODER_PRESETS

    if spec == INCEPTION:
        return INCEPTION, None
    if spec.startswith(ENCODER_PREFIX):
        name = spec[len(ENCODER_PREFIX):]
        if name not in ENCODER_PRESETS:
            raise ValueError(f"unknown encoder preset '{name}' in --features {spec}; known: "
                             f"{', '.join(sorted(ENCODER_PRESETS))}")
        return "encoder", name
    raise ValueError(f"--features {spec}: expected 'inception' or 'encoder:NAME' "
                     f"(NAME an encoder preset, e.g. encoder:dinov2-b or encoder:efficientnet-lite0)")


def _own_grid(encoder: nn.Module) -> tuple[int, int]:
    """The encoder's token grid at its own resolution (ViT: patch grid; CNN: one probe pass)."""
    patch_embed = getattr(encoder.model, "patch_embed", None)
    if patch_embed is not None:
        return tuple(patch_embed.grid_size)
    with torch.no_grad():
        fmap = encoder._feature_map(torch.zeros(1, 3, encoder.img_size, encoder.img_size))
    return tuple(fmap.shape[-2:])


def identify(spec: str = INCEPTION, encoder_weights: str | Path | None = None) -> tuple[str, int]:
    """The `id` and feature dimension of a feature network, without building it."""
    kind, name = parse_spec(spec)
    if kind == INCEPTION:
        if encoder_weights is not None:
            raise ValueError("--encoder-weights needs --features encoder:NAME")
        return INCEPTION, inception.FEATURE_DIM
    from pixelrepa.config import get_encoder_preset

    identity = f"{ENCODER_PREFIX}{name}"
    if encoder_weights is not None:
        if not Path(encoder_weights).is_file():
            raise FileNotFoundError(f"encoder weights file not found: {encoder_weights}")
        identity += f"@sha256:{file_digest(encoder_weights)[:16]}"
    return identity, get_encoder_preset(name).feature_dim


def build_feature_extractor(spec: str = INCEPTION, device: torch.device | str = "cpu",
                            encoder_weights: str | Path | None = None) -> tuple[nn.Module, dict]:
    """The feature network named by `spec` on `device` (eval mode) and its `describe` record.

    The module maps uint8 (N, 3, H, W) to `((N, D),)` and has `feature_dim` = D. The record's
    `id` identifies the network (and a local weights file by its SHA-256), so reference files made
    with another network can be refused. Raises (from `build_encoder`) when an encoder's weights are
    not reachable offline: pass `encoder_weights`."""
    identity, _ = identify(spec, encoder_weights)
    kind, name = parse_spec(spec)
    if kind == INCEPTION:
        return InceptionFeatures(inception.load_extractor(device)).eval(), {"id": INCEPTION, **inception.describe()}

    from pixelrepa.align.encoders import LITE0, build_encoder, lite0_weights
    from pixelrepa.config import get_encoder_preset

    cfg = get_encoder_preset(name)
    weights_sha = None
    if encoder_weights is not None:
        cfg = dataclasses.replace(cfg, weights=str(Path(encoder_weights).resolve()))
        weights_sha = file_digest(encoder_weights)
    try:
        encoder = build_encoder(cfg)
    except RuntimeError as err:  # weights not reachable (offline): a usage error, reported as such
        raise ValueError(f"--features {spec}: {err}") from err
    grid = _own_grid(encoder)
    if cfg.name == LITE0:
        weights_source = str(lite0_weights(cfg.weights))
    else:
        weights_source = cfg.weights or f"timm hub pretrained weights of {cfg.name}"
    record = {
        "id": identity,
        "network": f"encoder preset '{name}' ({cfg.name}, built at {cfg.img_size} px"
                   + (f", stage {cfg.stage})" if cfg.name == LITE0 else f", patch {cfg.patch_size})"),
        "features": f"{encoder.feature_dim}-d {POOLING} (TargetEncoder output on its own {grid[0]}x{grid[1]} "
                    f"grid, prefix / CLS tokens dropped), images in [-1, 1] resized (bilinear) to "
                    f"{cfg.img_size}x{cfg.img_size}",
        "pooling": POOLING,
        "encoder": dataclasses.asdict(cfg),
        "weights_source": weights_source,
        "weights_sha256": weights_sha,
    }
    return EncoderFeatures(encoder, grid).to(device).eval(), record


def network_id(meta: dict | None) -> str:
    """The feature network that made a reference, from its `meta`; files without one (ADM
    reference batches, older files) count as Inception."""
    network = (meta or {}).get("feature_network")
    if not isinstance(network, dict):
        return INCEPTION
    if "id" in network:
        return str(network["id"])
    return INCEPTION if "inception" in str(network.get("network", "")).lower() else "unknown"


def check_reference(path: str | Path, reference, identity: str, dim: int) -> None:
    """Refuse a loaded reference made with another feature network than `identity` (naming both),
    or with statistics of another dimension than `dim`."""
    made_with = network_id(reference.meta)
    if made_with != identity:
        raise ValueError(f"{path} was made with feature network '{made_with}', but this evaluation uses "
                         f"'{identity}': statistics of different networks are not comparable; make the "
                         f"reference with the same --features (pixelrepa eval ref-stats SRC OUT.npz --features ...)")
    if reference.mu.shape != (dim,):
        raise ValueError(f"{path}: 'mu' has shape {reference.mu.shape}, expected ({dim},)")


# ---------------------------------------------------------------------------
# Feature extraction across ranks
# ---------------------------------------------------------------------------

def rank_slice(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous image range [start, stop) of `rank`."""
    return rank * count // world_size, (rank + 1) * count // world_size


def gather_in_order(value: Any, start: int, error: str | None, world_size: int, rank: int,
                    failure: type[Exception] = ValueError) -> list | None:
    """Every rank's `value` on rank 0, ordered by the `start` of its slice (None on the other ranks).
    `error` is this rank's failure or None; a failure on any rank is raised as `failure` on every rank,
    so no rank waits forever. Collective; a single process gets [value]."""
    if world_size <= 1 or not dist.is_initialized():
        if error is not None:
            raise failure(error)
        return [value]
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object({"start": start, "value": value, "error": error}, gathered, dst=0)
    holder = ["; ".join(p["error"] for p in gathered if p["error"]) or None] if rank == 0 else [None]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise failure(holder[0])
    return None if rank != 0 else [p["value"] for p in sorted(gathered, key=lambda p: p["start"])]


def extract_features_distributed(source: ImageSource, extractor: nn.Module, batch_size: int, world,
                                 device: torch.device | str | None = None, progress=None) -> np.ndarray | None:
    """float32 (N, D) features of every image of `source` on rank 0 (in image order), None elsewhere.

    Each rank extracts its contiguous slice; the slices are gathered to rank 0 (`gather_object`).
    A failure on any rank (e.g. an unreadable image) is raised on every rank, as is a size
    mismatch between slices. Collective: every rank must call it. A single process (world size 1
    or no process group) is `extract_features(source, extractor, batch_size, device, progress)`."""
    device = world.device if device is None else device
    if world.world_size <= 1 or not dist.is_initialized():
        return extract_features(source, extractor, batch_size, device, progress)
    start, stop = rank_slice(len(source), world.rank, world.world_size)
    part = source.part(start, stop)
    value, error = (None, None), None
    try:
        if len(part):
            value = (extract_features(part, extractor, batch_size, device, progress), part.first_shape)
    except Exception as err:  # reported on every rank, so no rank waits forever
        error = f"rank {world.rank}: {err}"
    gathered = gather_in_order(value, start, error, world.world_size, world.rank)
    shapes = {tuple(shape) for _, shape in gathered or [] if shape is not None}
    message = f"{source.path}: images of mixed sizes across ranks ({sorted(shapes)})" if len(shapes) > 1 else None
    holder = [message]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise ValueError(holder[0])
    if not world.is_main:
        return None
    parts = [features for features, _ in gathered if features is not None]
    features = np.concatenate(parts)
    if len(features) != len(source):
        raise RuntimeError(f"gathered {len(features)} feature rows for {len(source)} images")
    return features


def check_count(count: int, name: str, metrics: list[str] | None = None, is_splits: int = 10) -> None:
    """Refuse, before any network pass, a source too small for the statistics or the metrics."""
    if metrics and "is" in metrics and (is_splits < 1 or count < is_splits):
        raise ValueError(f"{name} has {count} image(s); the Inception Score in --is-splits {is_splits} needs "
                         f"splits >= 1 and at least {max(is_splits, 1)} images")
    if metrics and "pr" in metrics and count <= PR_NEIGHBORHOOD:
        raise ValueError(f"{name} has {count} image(s); precision / recall (k = {PR_NEIGHBORHOOD}) needs at least "
                         f"{PR_NEIGHBORHOOD + 1}")
    if count < 2:
        raise ValueError(f"{name} has {count} image(s); the covariance needs at least 2")


def features_of(source: ImageBatches, extractor: torch.nn.Module, batch_size: int, device: torch.device,
                label: str, world=None) -> tuple[np.ndarray | None, float]:
    """Features of a source with the feature network, and the seconds spent. Under torchrun (`world`)
    each rank extracts its slice and rank 0 gets all features in image order; the others get None."""
    start = time.perf_counter()
    quiet = True if world is not None and not world.is_main else None
    with tqdm(total=len(source), desc=f"features ({label})", unit="img", dynamic_ncols=True, disable=quiet) as bar:
        if world is None:
            features = extract_features(source, extractor, batch_size, device, bar.update)
        else:
            features = extract_features_distributed(source, extractor, batch_size, world,
                                                                     device, bar.update)
    return features, time.perf_counter() - start


def reference_batch(path: str | Path, reference) -> ImageSource | None:
    """Where KID and precision / recall get their reference features: None when `reference` stores
    them; the file's reference batch `arr_0` (ADM's reference files) as an image source, whose
    features the caller computes with its own network; else an error saying how to get them."""
    if reference.features is not None:
        return None
    if reference.batch_images is None:
        raise ValueError(f"{path} holds only mu and sigma; KID and precision / recall need reference "
                         "features: make it with `pixelrepa eval ref-stats SRC OUT.npz --keep-features`, "
                         "pass the reference images, or use a file with a reference batch `arr_0` (ADM's)")
    return ImageSource(path)


def is_image_npz(path: Path) -> bool:
    """Images (`arr_0`) rather than statistics; a file with both (the ADM reference batches) counts as statistics."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return "arr_0.npy" in names and "mu.npy" not in names
    except zipfile.BadZipFile:
        return False
