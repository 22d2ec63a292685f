"""Sample-quality metrics: FID, KID, precision / recall on features, the Inception Score on classifier logits;
image sources; reference statistics.

Images are read in batches from a folder of PNGs (or a sample folder's `images/`), an ADM `.npz`
(`arr_0` uint8 (N, H, W, 3)) or a pack folder, and only their features are kept in memory.
KID and precision / recall call torch-fidelity's functions on the features (its defaults: KID
with a cubic polynomial kernel, unbiased MMD, 100 subsets of up to 1000; precision / recall with
k = 3 neighbours, input 1 = generated, input 2 = real). The Inception Score calls torch-fidelity's
on classifier logits (its defaults: 10 splits of the images shuffled with seed 2020).

Sample counts: the statistics need at least 2 samples. With n <= feature dimension the
covariance is singular (rank <= n - 1); FID is still computed, through the eps fix of
`frechet_distance`, but is strongly biased, so `feature_statistics` warns (as a
`SmallSampleWarning`). Reference files hold `mu` (D,), `sigma` (D, D) float64 and optionally
`features` (N, D) for KID and precision / recall against them. The published files load as they
are: JiT's and PixelREPA's `jit_in256_stats.npz` (`mu`, `sigma`, what their torch-fidelity fork
reads) and ADM's `VIRTUAL_imagenet256_labeled.npz` (`mu`, `sigma`, the spatial `mu_s`, `sigma_s`
of sFID, and the reference batch `arr_0` uint8 (10000, 256, 256, 3), whose features, computed
with the evaluation's own network, serve KID and precision / recall).
"""

from __future__ import annotations

import copy
import json
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from pixelrepa.data.packed import MANIFEST as PACK_MANIFEST
from pixelrepa.data.packed import PackedDataset
from pixelrepa.evaluation.inception import classifier_missing_reason
from pixelrepa.files import atomic_write
from pixelrepa.images import read_png
from pixelrepa.evaluation.sample_folder import IMAGES_DIR

FID_EPS = 1e-6
IMAG_TOLERANCE = 1e-3  # largest |imaginary part| of sqrtm's diagonal taken as rounding noise


class SmallSampleWarning(UserWarning):
    """Fewer samples than the feature dimension: the covariance is singular and FID biased."""


# ---------------------------------------------------------------------------
# Statistics and distances
# ---------------------------------------------------------------------------

PR_NEIGHBORHOOD = 3
"""k of the k-nearest-neighbour precision / recall (Kynkaanniemi et al.)."""
METRICS = ("fid", "kid", "pr", "is")
"""What `score` computes: FID (or FD in an encoder's space), KID, precision / recall, Inception Score."""


@dataclass(frozen=True)
class ScoreSettings:
    """KID and Inception Score settings; the defaults are torch-fidelity's, used by every evaluation."""

    kid_subsets: int = 100
    """KID is the mean (and std) over this many random subsets."""
    kid_subset_size: int = 1000
    """Images per KID subset, capped at the smaller set."""
    kid_seed: int = 2020
    """Seed of the KID subset draws."""
    is_splits: int = 10
    """The Inception Score is the mean (and std) over this many splits."""
    is_seed: int = 2020
    """The Inception Score's split shuffle."""


DEFAULTS = ScoreSettings()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64, of features (N, D); N >= 2, warns when N <= D."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    n, dim = features.shape
    if n < 2:
        raise ValueError(f"{n} sample(s): the covariance needs at least 2")
    warn_small_sample(n, dim)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def warn_small_sample(n: int, dim: int) -> None:
    """A `SmallSampleWarning` when n <= dim: the covariance is singular and FID strongly biased."""
    if n <= dim:
        warnings.warn(f"{n} samples for {dim}-d features: the covariance is singular (rank <= {n - 1}) "
                      "and FID is strongly biased; use more samples than the feature dimension",
                      SmallSampleWarning, stacklevel=3)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    When the product's square root is not finite (nearly singular covariances), eps * I is added
    to both covariances; an imaginary part up to `IMAG_TOLERANCE` on the diagonal is dropped."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(covmean.diagonal().imag))
        if largest > IMAG_TOLERANCE:
            raise ValueError(f"sqrt(sigma1 sigma2) has an imaginary component of {largest:.3g}; "
                             "the covariances are not valid (not symmetric positive semi-definite)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(generated: np.ndarray, real: np.ndarray, subsets: int = DEFAULTS.kid_subsets,
                              subset_size: int = DEFAULTS.kid_subset_size, seed: int = DEFAULTS.kid_seed) -> dict:
    """KID through torch-fidelity (unbiased MMD^2, polynomial kernel degree 3, gamma 1/D, coef 1)
    over `subsets` random subsets of min(subset_size, N1, N2) samples: mean, std and the settings."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(generated), len(real))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {len(generated)} and {len(real)}")
    out = kid_features_to_metric(torch.as_tensor(generated), torch.as_tensor(real), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"mean": out[KEY_METRIC_KID_MEAN], "std": out[KEY_METRIC_KID_STD], "subsets": subsets,
            "subset_size": size, "seed": seed, "kernel": "polynomial degree 3, gamma 1/D, coef0 1"}


def precision_recall(generated: np.ndarray, real: np.ndarray, neighborhood: int = PR_NEIGHBORHOOD) -> dict:
    """Improved precision / recall (Kynkäänniemi et al.) through torch-fidelity: k-NN balls in feature space."""
    from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                           prc_features_to_metric)

    if min(len(generated), len(real)) <= neighborhood:
        raise ValueError(f"precision / recall with k = {neighborhood} needs more than {neighborhood} samples "
                         f"in each set, got {len(generated)} and {len(real)}")
    out = prc_features_to_metric(torch.as_tensor(generated, dtype=torch.float32),
                                 torch.as_tensor(real, dtype=torch.float32), prc_neighborhood=neighborhood,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL],
            "f_score": out[KEY_METRIC_F_SCORE], "neighborhood": neighborhood}


def inception_score(logits: np.ndarray, splits: int = DEFAULTS.is_splits, seed: int = DEFAULTS.is_seed) -> dict:
    """Inception Score through torch-fidelity on logits (N, C): the images are shuffled (`seed`) and cut
    into `splits` parts; per part exp(mean_x KL(p(y|x) || p(y))), p = softmax of the logits and p(y)
    the part's mean; the value is the mean over the parts, with their standard deviation."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {logits.shape}")
    if splits < 1 or len(logits) < splits:
        raise ValueError(f"the Inception Score in {splits} splits needs at least {max(splits, 1)} images "
                         f"(and splits >= 1), got {len(logits)}")
    out = isc_features_to_metric(torch.as_tensor(logits), splits=splits, shuffle=True, rng_seed=seed)
    return {"value": out[KEY_METRIC_ISC_MEAN], "std": out[KEY_METRIC_ISC_STD], "available": True,
            "splits": splits, "seed": seed, "shuffle": True}


def score(features: np.ndarray, reference: Reference | None, metrics: Sequence[str] = ("fid",),
          settings: ScoreSettings = DEFAULTS, logits: np.ndarray | None = None) -> dict:
    """`metrics` (of METRICS) of features (N, D) against `reference`: {"fid": float, "kid": dict, "pr": dict,
    "is": dict}. FID needs the reference's statistics, KID and precision / recall its features; the
    Inception Score is of `logits` (N, C) alone, and without them is reported as unavailable. Warns
    (`SmallSampleWarning`) when N <= D."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    warn_small_sample(*np.shape(features))
    values: dict[str, object] = {}
    if "fid" in metrics:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallSampleWarning)  # said once, above
            mu, sigma = feature_statistics(features)
        values["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if "kid" in metrics:
        values["kid"] = kernel_inception_distance(features, reference.features, settings.kid_subsets,
                                                  settings.kid_subset_size, settings.kid_seed)
    if "pr" in metrics:
        values["pr"] = precision_recall(features, reference.features, PR_NEIGHBORHOOD)
    if "is" in metrics:
        values["is"] = {"value": None, "available": False, "reason": classifier_missing_reason()} if logits is None \
            else inception_score(logits, settings.is_splits, settings.is_seed)
    return values


def scalars(values: dict) -> dict[str, float | None]:
    """The numbers of a `score` result as flat columns: fid, kid_mean, kid_std, precision, recall, is_mean,
    is_std (those computed; None where unavailable)."""
    out: dict[str, float | None] = {}
    if "fid" in values:
        out["fid"] = float(values["fid"])
    if "kid" in values:
        out["kid_mean"], out["kid_std"] = float(values["kid"]["mean"]), float(values["kid"]["std"])
    if "pr" in values:
        out["precision"], out["recall"] = float(values["pr"]["precision"]), float(values["pr"]["recall"])
    if "is" in values:
        available = values["is"]["available"]
        out["is_mean"] = float(values["is"]["value"]) if available else None
        out["is_std"] = float(values["is"]["std"]) if available else None
    return out


# ---------------------------------------------------------------------------
# Reference statistics files
# ---------------------------------------------------------------------------

@dataclass
class Reference:
    """Statistics of a reference set; `features` only when stored (needed for KID, precision / recall)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    meta: dict | None = None
    batch_images: int | None = None
    """Images in the file's reference batch `arr_0` (an ADM reference file), whose features stand
    in for `features` when those are not stored; None without one."""


def save_reference(path: str | Path, reference: Reference) -> Path:
    """Write `mu`, `sigma` (and `features`, `meta` as JSON) to an `.npz`, atomically."""
    path = Path(path)
    arrays = {"mu": reference.mu, "sigma": reference.sigma}
    if reference.features is not None:
        arrays["features"] = reference.features
    if reference.meta is not None:
        arrays["meta"] = np.array(json.dumps(reference.meta))
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy adds no .npz suffix
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


def load_reference(path: str | Path, dim: int | None = None) -> Reference:
    """Read and check a reference `.npz`: `mu` (D,), `sigma` (D, D), optional `features` (N, D)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference statistics file at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:  # only these members: an ADM `arr_0` is 2 GB
            arrays = {key: data[key] for key in ("mu", "sigma", "features", "meta") if key in data.files}
            names = data.files
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz file: {err}") from None
    missing = [key for key in ("mu", "sigma") if key not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {' and '.join(repr(k) for k in missing)} "
                         f"(has: {', '.join(names) or 'nothing'}); "
                         "a reference file holds 'mu' (D,) and 'sigma' (D, D)")
    mu, sigma, features = arrays["mu"], arrays["sigma"], arrays.get("features")
    expected = dim if dim is not None else mu.shape[0] if mu.ndim == 1 else "D"
    if mu.shape != (expected,):
        raise ValueError(f"{path}: 'mu' has shape {mu.shape}, expected ({expected},)")
    if sigma.shape != (expected, expected):
        raise ValueError(f"{path}: 'sigma' has shape {sigma.shape}, expected ({expected}, {expected})")
    if features is not None and (features.ndim != 2 or features.shape[1] != expected):
        raise ValueError(f"{path}: 'features' has shape {features.shape}, expected (N, {expected})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: 'mu' or 'sigma' holds non-finite values")
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else None
    batch_images = len(ImageSource(path)) if "arr_0" in names else None  # reads the header alone
    return Reference(mu.astype(np.float64), sigma.astype(np.float64), features, meta, batch_images)


# ---------------------------------------------------------------------------
# Image sources and feature extraction
# ---------------------------------------------------------------------------

class ImageBatches(Protocol):
    """Images read in batches, what `extract_features` takes: `len` images in all, in a fixed order."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """uint8 (B, 3, H, W) CPU tensors of up to `batch_size` images each."""


class ImageSource:
    """The images of a PNG folder, a sample folder, an ADM `.npz` or a pack folder (an `ImageBatches`).

    All images must have one size. `max_images` keeps only the first ones; `part(start, stop)` is the
    source of images [start, stop) alone (a rank's slice under torchrun)."""

    def __init__(self, path: str | Path, max_images: int | None = None):
        self.path = Path(path)
        if max_images is not None and max_images < 1:
            raise ValueError(f"the image limit must be positive, got {max_images}")
        if not self.path.exists():
            raise FileNotFoundError(f"no image source at {self.path}")
        if self.path.is_file():
            if self.path.suffix != ".npz":
                raise ValueError(f"{self.path}: an image source is a folder of PNGs, a pack folder or an .npz")
            self.kind, total = "npz", self._npz_header()[0][0]
        elif (self.path / PACK_MANIFEST).is_file() and (self.path / "images.u8").is_file():
            self.kind, self._pack = "pack", PackedDataset(self.path)
            total = len(self._pack)
        else:
            folder = self.path / IMAGES_DIR if (self.path / IMAGES_DIR).is_dir() else self.path
            self.kind, self._pngs = "png-folder", sorted(folder.glob("*.png"))
            total = len(self._pngs)
            if not total:
                raise ValueError(f"{folder} holds no .png images")
        self.total = total
        self.count = total if max_images is None else min(total, max_images)
        self.start = 0
        self.first_shape: tuple[int, ...] | None = None
        """(H, W, 3) of the first image read, once `batches` has read one."""

    def __len__(self) -> int:
        return self.count

    def part(self, start: int, stop: int) -> "ImageSource":
        """Images [start, stop) of this source."""
        part = copy.copy(self)
        part.start, part.count, part.first_shape = self.start + start, stop - start, None
        return part

    def describe(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "available": self.total, "used": self.count}

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """uint8 (B, 3, H, W) tensors, checked to share one size."""
        first = "the first image" if self.start == 0 else f"image {self.start}"
        index = self.start
        for batch in self._chunks(batch_size):
            for image in batch:
                if self.first_shape is None:
                    self.first_shape = image.shape
                if image.shape != self.first_shape:
                    raise ValueError(f"{self._name(index)} is {image.shape[1]}x{image.shape[0]}, but {first} is "
                                     f"{self.first_shape[1]}x{self.first_shape[0]}: images of mixed sizes")
                index += 1
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)

    def _name(self, index: int) -> str:
        return str(self._pngs[index]) if self.kind == "png-folder" else f"{self.path} image {index}"

    def _chunks(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        stop = self.start + self.count
        starts = range(self.start, stop, batch_size)
        if self.kind == "png-folder":
            for s in starts:
                yield [read_png(p) for p in self._pngs[s:min(s + batch_size, stop)]]
        elif self.kind == "pack":
            for s in starts:
                yield list(np.asarray(self._pack.images[s:min(s + batch_size, stop)]))
        else:  # one sequential pass through the (possibly compressed) zip member, which does not seek
            (_, height, width, _), offset = self._npz_header()
            image_bytes = height * width * 3
            with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
                f.read(offset)
                for skip in range(0, self.start, batch_size):
                    f.read(min(batch_size, self.start - skip) * image_bytes)
                for s in starts:
                    n = min(batch_size, stop - s)
                    data = np.frombuffer(f.read(n * image_bytes), dtype=np.uint8)
                    if data.size != n * image_bytes:
                        raise ValueError(f"{self.path}: 'arr_0' is truncated at image {s + data.size // image_bytes}")
                    yield list(data.reshape(n, height, width, 3))

    def _npz_header(self) -> tuple[tuple[int, ...], int]:
        """Shape of `arr_0` and where its data start in the member; checks it is uint8 (N, H, W, 3)."""
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
        except KeyError:
            raise ValueError(f"{self.path} has no 'arr_0' (the ADM sample layout: uint8 (N, H, W, 3))") from None
        except (zipfile.BadZipFile, ValueError) as err:
            raise ValueError(f"{self.path} is not a readable .npz file: {err}") from None
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{self.path}: 'arr_0' is {dtype} {shape}{' (Fortran order)' if fortran else ''}, "
                             "expected uint8 (N, H, W, 3)")
        return shape, offset


@torch.no_grad()
def extract_features(source: ImageBatches, extractor: nn.Module, batch_size: int = 50,
                     device: torch.device | str = "cpu", progress=None) -> np.ndarray:
    """float32 (N, D) features of every image of `source`, batch by batch (`extractor` maps uint8
    (B, 3, H, W) to `((B, D),)`); `progress(n)` after each batch."""
    return extract_feature_sets(source, {"features": extractor}, batch_size, device, progress)["features"]


def extract_feature_sets(source: ImageBatches, extractors: Mapping[str, nn.Module], batch_size: int = 50,
                         device: torch.device | str = "cpu", progress=None) -> dict[str, np.ndarray]:
    """`extract_features` under several networks at once, each image read (or sampled) once:
    {name: float32 (N, D_name)}."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in extractors}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions on GPU, as on CPU
    try:
        for batch in source.batches(batch_size):
            x = batch.contiguous().to(device)
            for name, extractor in extractors.items():
                parts[name].append(extractor(x)[0].float().cpu().numpy())
            if progress is not None:
                progress(len(batch))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return {name: np.concatenate(p) if p else np.zeros((0, 0), np.float32) for name, p in parts.items()}
