"""The per-class diversity probe: does a model collapse within classes, and do the tight classes
collapse most?

For each class c, with G_c the generated images' features and R_c the real images' features, in
each feature space (a representation encoder, the FID Inception-v3):

* `mean_pairwise_distance(G_c)` and of R_c: the mean L2 distance over the pairs i < j;
* the **diversity ratio** gen / real (1: as varied as the data, < 1: collapse, 0: one image);
* precision / recall (Kynkäänniemi et al. 2019, k = 3: `metrics.precision_recall`) of G_c against R_c;
* the real class's **tightness**, `mean_centroid_distance(R_c)`: the mean L2 distance of R_c's
  rows to their mean (small = tight).

Every feature row is **L2-normalised first** (distances in [0, 2], comparable across spaces and
encoders); all four numbers use the normalised rows. Across classes, `correlation` gives the
Pearson and Spearman (Pearson of average ranks) coefficients between the tightness in the
tightness space (the encoder's when it is measured) and each space's diversity ratio. The paper's
claim, "tighter classes collapse more under REPA", predicts a **positive** coefficient: small
tightness with small ratio. The most-collapsed classes are those of lowest ratio in the first
space measured.

The functions take feature arrays, so any feature network (or none) can feed them; `ImageSet`
reads the images of a sample folder, an ADM `.npz`, a pack or an in-memory tensor by index, and
`write_outputs` writes diversity.csv, diversity.json, diversity.png (tightness vs ratio, one
point per class) and collapsed.png (each most-collapsed class: a row of generated samples above
a row of real ones). `run_diversity(DiversitySettings(samples, data, ...), device)` does all of it
for a sample folder, an .npz or a model to sample from, against a pack; `pixelrepa probe diversity`
is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn
from tqdm import tqdm

from pixelrepa.config import ENCODER_PRESETS, RunConfig, apply_overrides, get_encoder_preset
from pixelrepa.loading import Ema, load_model
from pixelrepa.sampling import ClassLayout

from pixelrepa.images import read_png

from pixelrepa.evaluation.sample_folder import IMAGES_DIR, MANIFEST_NAME, NPZ_NAME, png_path
from pixelrepa.evaluation.metrics import PR_NEIGHBORHOOD, extract_features, precision_recall
from pixelrepa.evaluation.results import write_result_set
from pixelrepa.files import created

DIVERSITY_FORMAT = "pixelrepa-probe-diversity/1"
SPACES = ("encoder", "inception")
DEFAULT_TOP = 5
PER_SPACE = ("gen_distance", "real_distance", "ratio", "precision", "recall", "real_tightness")
NORMALISATION = "feature rows L2-normalised before every distance, precision and recall"


# ---------------------------------------------------------------------------
# The metrics, on feature arrays
# ---------------------------------------------------------------------------

def normalise(features: np.ndarray) -> np.ndarray:
    """float64 rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance ||x_i - x_j|| over the n (n - 1) / 2 pairs i < j of the rows of x (n >= 2);
    differences are taken row by row, so identical rows are exactly 0 apart."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if x.ndim != 2 or n < 2:
        raise ValueError(f"the mean pairwise distance needs an (n, d) matrix with n >= 2, got shape {x.shape}")
    total = sum(float(np.linalg.norm(x[i + 1:] - x[i], axis=1).sum()) for i in range(n - 1))
    return total / (n * (n - 1) / 2)


def mean_centroid_distance(x: np.ndarray) -> float:
    """Mean L2 distance of the rows of x to their mean (the class's tightness; small = tight)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 1:
        raise ValueError(f"the centroid distance needs an (n, d) matrix with n >= 1, got shape {x.shape}")
    return float(np.linalg.norm(x - x.mean(axis=0), axis=1).mean())


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when the denominator is 0 (a real class of identical images)."""
    return numerator / denominator if denominator > 0 else math.nan


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson's r over the pairs where both are finite; NaN with fewer than 3 pairs or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / scale if scale > 0 else math.nan


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span."""
    return rankdata(values, method="average")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks, over the pairs where both are finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return pearson(average_ranks(a[keep]), average_ranks(b[keep]))


def class_metrics(generated: np.ndarray, generated_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                  classes: Sequence[int], k: int = PR_NEIGHBORHOOD) -> dict[int, dict]:
    """{c: {"gen_distance", "real_distance", "ratio", "precision", "recall", "real_tightness", "n_generated",
    "n_real"}} in one feature space (rows L2-normalised first). Every class needs >= 2 images on
    each side; precision / recall are NaN for a class with k or fewer on either side."""
    generated, real = normalise(generated), normalise(real)
    generated_labels, real_labels = np.asarray(generated_labels), np.asarray(real_labels)
    if len(generated_labels) != len(generated) or len(real_labels) != len(real):
        raise ValueError(f"{len(generated)} / {len(real)} feature rows but {len(generated_labels)} / "
                         f"{len(real_labels)} labels")
    out = {}
    for c in classes:
        g, r = generated[generated_labels == c], real[real_labels == c]
        check_class_counts(int(c), len(g), len(r))
        gen_distance, real_distance = mean_pairwise_distance(g), mean_pairwise_distance(r)
        if min(len(g), len(r)) > k:
            pr = precision_recall(g.astype(np.float32), r.astype(np.float32), k)
            precision, recall = float(pr["precision"]), float(pr["recall"])
        else:
            precision = recall = math.nan
        out[int(c)] = {"gen_distance": gen_distance, "real_distance": real_distance,
                       "ratio": ratio(gen_distance, real_distance), "precision": precision, "recall": recall,
                       "real_tightness": mean_centroid_distance(r), "n_generated": len(g), "n_real": len(r)}
    return out


def check_class_counts(c: int, generated: int, real: int) -> None:
    if generated < 2 or real < 2:
        raise ValueError(f"class {c} has {generated} generated and {real} real image(s); a pairwise distance needs "
                         "at least 2 on each side: leave it out (--classes), or raise --per-class / --real-per-class")


# ---------------------------------------------------------------------------
# Rows and the summary
# ---------------------------------------------------------------------------

def table_rows(results: dict[str, dict[int, dict]], class_names: Sequence[str] | None = None) -> list[dict]:
    """One row per class: class, name, n_generated, n_real, then {space}_{metric} for each space."""
    spaces = list(results)
    classes = sorted(results[spaces[0]])
    rows = []
    for c in classes:
        first = results[spaces[0]][c]
        row = {"class": c, "name": name_of(c, class_names), "n_generated": first["n_generated"],
               "n_real": first["n_real"]}
        for space in spaces:
            row.update({f"{space}_{m}": results[space][c][m] for m in PER_SPACE})
        rows.append(row)
    return rows


def name_of(c: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)


def tightness_space(spaces: Sequence[str]) -> str:
    """The encoder's space when measured (the paper's), else the first."""
    return "encoder" if "encoder" in spaces else spaces[0]


def most_collapsed(rows: list[dict], space: str, top: int) -> list[dict]:
    """The `top` rows of lowest {space}_ratio (NaN last), as {class, name, ratio, precision, recall}."""
    key = f"{space}_ratio"
    ranked = sorted(rows, key=lambda r: (not math.isfinite(r[key]), r[key] if math.isfinite(r[key]) else 0.0,
                                         r["class"]))
    return [{"class": r["class"], "name": r["name"], "ratio": r[key], "precision": r[f"{space}_precision"],
             "recall": r[f"{space}_recall"]} for r in ranked[:top]]


def summarise(rows: list[dict], spaces: Sequence[str], top: int = DEFAULT_TOP) -> dict:
    """Means per space, the tightness-vs-ratio correlations and the most-collapsed classes."""
    tight = tightness_space(spaces)
    tightness = [r[f"{tight}_real_tightness"] for r in rows]

    def mean(key: str) -> float:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        return float(np.mean(values)) if values else math.nan

    return {
        "classes": len(rows),
        "tightness_space": tight,
        "collapse_space": spaces[0],
        "mean_ratio": {s: mean(f"{s}_ratio") for s in spaces},
        "mean_precision": {s: mean(f"{s}_precision") for s in spaces},
        "mean_recall": {s: mean(f"{s}_recall") for s in spaces},
        "correlation": {s: {"pearson": pearson(tightness, [r[f"{s}_ratio"] for r in rows]),
                            "spearman": spearman(tightness, [r[f"{s}_ratio"] for r in rows]),
                            "x": f"{tight}_real_tightness", "y": f"{s}_ratio"} for s in spaces},
        "claim": "tighter classes collapse more: a positive correlation (small tightness with small ratio)",
        "most_collapsed": most_collapsed(rows, spaces[0], top),
    }


# ---------------------------------------------------------------------------
# Images by index: sample folders, npz files, packs, tensors
# ---------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Labelled images read by index: `read(indices)` gives uint8 (B, 3, H, W); an `ImageBatches` of
    all of them in order, or of `subset(indices)`."""

    labels: np.ndarray
    read: Callable[[np.ndarray], Tensor]
    source: dict = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, len(self), batch_size):
            yield self.read(np.arange(start, min(start + batch_size, len(self))))

    def subset(self, indices: np.ndarray) -> "ImageSet":
        """The images at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.labels[indices], lambda idx: self.read(indices[np.asarray(idx)]), self.source,
                        self.class_names)

    @classmethod
    def from_tensor(cls, images: Tensor, labels: Sequence[int], source: dict | None = None) -> "ImageSet":
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return cls(labels, lambda idx: images[torch.as_tensor(np.asarray(idx), dtype=torch.long)], source or {})

    @classmethod
    def from_pack(cls, path: str | Path, expected_size: int | None = None) -> "ImageSet":
        from pixelrepa.data.packed import PackedDataset

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no pack folder at {path} (make one with pixelrepa data pack / prepare)")
        pack = PackedDataset(path, expected_size=expected_size)

        def read(idx: np.ndarray) -> Tensor:
            return torch.from_numpy(np.asarray(pack.images[np.asarray(idx)])).permute(0, 3, 1, 2).contiguous()

        return cls(pack.labels, read, {"path": str(path.resolve()), "kind": "pack", "available": len(pack)},
                   pack.class_names)

    @classmethod
    def from_samples(cls, path: str | Path) -> "ImageSet":
        """A `pixelrepa sample` folder (its PNGs, labels from the manifest's class layout; or its
        samples.npz) or an ADM `.npz` with `arr_0` and `labels` (read whole into memory)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no sample folder or .npz at {path}")
        if path.is_file():
            return _from_npz(path)
        manifest_path = path / MANIFEST_NAME
        if (path / IMAGES_DIR).is_dir() and any((path / IMAGES_DIR).glob("*.png")):
            try:
                settings = json.loads(manifest_path.read_text())["settings"]
                layout = ClassLayout(tuple(settings["classes"]), int(settings["per_class"]))
                count = int(settings["num_images"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: no readable {MANIFEST_NAME} with the class layout ({err}); the labels "
                                 "of a sample folder come from it: pass the folder `pixelrepa sample` wrote") from None
            labels = np.array([layout(k) for k in range(count)], dtype=np.int64)

            def read(idx: np.ndarray) -> Tensor:
                missing = [int(k) for k in idx if not png_path(path, int(k)).is_file()]
                if missing:
                    raise FileNotFoundError(f"{png_path(path, missing[0])} is missing: rerun the same pixelrepa "
                                            "sample command to complete the folder")
                arrays = np.stack([read_png(png_path(path, int(k))) for k in idx])
                return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()

            return cls(labels, read, {"path": str(path.resolve()), "kind": "sample folder (PNGs)",
                                      "available": count})
        if (path / NPZ_NAME).is_file():
            return _from_npz(path / NPZ_NAME)
        raise ValueError(f"{path} holds neither {IMAGES_DIR}/*.png nor {NPZ_NAME}: pass a `pixelrepa sample` "
                         "output folder, an .npz with arr_0 and labels, or a model / run to sample from")


def _from_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files or "labels" not in data.files:
                raise ValueError(f"{path} needs 'arr_0' (uint8 N, H, W, 3) and 'labels' (N,), has: "
                                 f"{', '.join(data.files)}; the probe compares classes, so the labels are needed")
            images, labels = data["arr_0"], data["labels"].astype(np.int64)
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz: {err}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape} with {len(labels)} labels; expected "
                         "uint8 (N, H, W, 3) and N labels")
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    return ImageSet(labels, lambda idx: tensor[torch.as_tensor(np.asarray(idx), dtype=torch.long)].contiguous(),
                    {"path": str(path.resolve()), "kind": "npz", "available": len(labels)})


def select_per_class(labels: np.ndarray, classes: Sequence[int], count: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices: for each class, `count` of its images drawn without replacement (seeded per
    class), or all of them when `count` is None or at least what the class has."""
    labels = np.asarray(labels)
    chosen = []
    for c in classes:
        where = np.flatnonzero(labels == c)
        if count is not None and len(where) > count:
            where = np.random.default_rng([seed, int(c)]).choice(where, size=count, replace=False)
        chosen.append(where)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def common_classes(generated: np.ndarray, real: np.ndarray, classes: Sequence[int] | None = None) -> list[int]:
    """`classes`, or the classes present on both sides; refuses an empty set and a class missing on a side."""
    have_gen, have_real = set(np.unique(generated).tolist()), set(np.unique(real).tolist())
    if classes is None:
        shared = sorted(have_gen & have_real)
        if not shared:
            raise ValueError(f"no class is in both the generated images ({_listing(have_gen)}) and the real ones "
                             f"({_listing(have_real)}): sample the classes of the pack, or pass another pack")
        return shared
    chosen = sorted(set(int(c) for c in classes))
    for c in chosen:
        if c not in have_gen or c not in have_real:
            raise ValueError(f"class {c} has no {'generated' if c not in have_gen else 'real'} images: leave it "
                             "out of --classes")
    return chosen


def _listing(values: set, limit: int = 8) -> str:
    ordered = sorted(values)
    text = ", ".join(str(v) for v in ordered[:limit])
    return (text + f", ... ({len(ordered)} in all)" if len(ordered) > limit else text) or "none"


def extract(extractor: nn.Module, images: ImageSet, indices: np.ndarray, batch_size: int = 64,
            device: torch.device | str = "cpu", progress: Callable[[int], object] | None = None) -> np.ndarray:
    """float32 (len(indices), D) features of the images at `indices` (`metrics.extract_features`)."""
    return extract_features(images.subset(indices), extractor, batch_size, device, progress)


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------

def columns(spaces: Sequence[str]) -> list[str]:
    return ["class", "name", "n_generated", "n_real", *(f"{s}_{m}" for s in spaces for m in PER_SPACE)]


def format_table(rows: list[dict], summary: dict, spaces: Sequence[str]) -> str:
    """A short text table: per class, each space's ratio, precision and recall, and the tightness."""
    tight = summary["tightness_space"]
    head = f"{'class':>6} {'name':>12} {'gen':>4} {'real':>4} " + "".join(
        f"{s[:3] + ' ratio':>10} {'P':>6} {'R':>6} " for s in spaces) + f"{'tight (' + tight[:3] + ')':>12}"
    lines = [head]
    for row in rows:
        lines.append(f"{row['class']:>6} {row['name'][:12]:>12} {row['n_generated']:>4} {row['n_real']:>4} " + "".join(
            f"{row[f'{s}_ratio']:>10.3f} {row[f'{s}_precision']:>6.3f} {row[f'{s}_recall']:>6.3f} " for s in spaces)
            + f"{row[f'{tight}_real_tightness']:>12.4f}")
    lines.append("")
    for s in spaces:
        corr = summary["correlation"][s]
        lines.append(f"{s}: mean ratio {summary['mean_ratio'][s]:.3f}, precision {summary['mean_precision'][s]:.3f}, "
                     f"recall {summary['mean_recall'][s]:.3f}; {tight} tightness vs ratio: Pearson "
                     f"{corr['pearson']:.3f}, Spearman {corr['spearman']:.3f}")
    collapsed = ", ".join(f"{c['name']} ({c['ratio']:.3f})" for c in summary["most_collapsed"])
    lines.append(f"most collapsed ({summary['collapse_space']} ratio): {collapsed}")
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, spaces: Sequence[str], path: Path) -> None:
    """diversity.png: per space, x = real tightness, y = diversity ratio, one labelled point per class."""
    from pixelrepa.evaluation.plots import ScatterPanel, scatter_plot

    tight = summary["tightness_space"]
    panels = []
    for s in spaces:
        corr = summary["correlation"][s]
        points = [(r[f"{tight}_real_tightness"], r[f"{s}_ratio"], r["name"]) for r in rows
                  if math.isfinite(r[f"{tight}_real_tightness"]) and math.isfinite(r[f"{s}_ratio"])]
        panels.append(ScatterPanel(f"{s}: Pearson {corr['pearson']:.2f}, Spearman {corr['spearman']:.2f}",
                                   f"real tightness ({tight}, mean distance to centroid)",
                                   f"diversity ratio gen / real ({s})", points, hline=1.0))
    scatter_plot(panels, path)


def collapsed_grid(generated: ImageSet, generated_index: np.ndarray, real: ImageSet, real_index: np.ndarray,
                   collapsed: list[dict], path: Path, columns_max: int = 8) -> None:
    """collapsed.png: for each class of `collapsed`, a row of its generated images above a row of real ones
    (the first of those the probe used; as many columns as the smaller side has, up to `columns_max`)."""
    from pixelrepa.images import save_labelled_grid

    if not collapsed:
        return
    gen_labels, real_labels = generated.labels[generated_index], real.labels[real_index]
    cols = min([columns_max] + [int(min((gen_labels == c["class"]).sum(), (real_labels == c["class"]).sum()))
                                for c in collapsed])
    tiles, names = [], []
    for c in collapsed:
        gen = generated.read(generated_index[gen_labels == c["class"]][:cols])
        ref = real.read(real_index[real_labels == c["class"]][:cols])
        if gen.shape[-2:] != ref.shape[-2:]:  # show both at the generated size
            ref = torch.nn.functional.interpolate(ref.float(), size=gen.shape[-2:], mode="bilinear",
                                                  antialias=True).round().clamp(0, 255).to(torch.uint8)
        tiles += [gen, ref]
        names += [f"{c['name'][:8]} gen", f"{c['name'][:8]} real"]
    images = torch.cat(tiles)
    scale = max(1, 64 // images.shape[-1])
    save_labelled_grid(images, names, path, scale=scale)


def write_outputs(out: Path, record: dict, rows: list[dict], summary: dict, spaces: Sequence[str]) -> None:
    """diversity.csv, diversity.json (`record` + summary + rows as `results`, NaN as null), diversity.png."""
    write_result_set(out, "diversity", rows, columns(spaces), {**record, "summary": summary, "results": rows},
                     plot=lambda path: plot(rows, summary, spaces, path))

# ---------------------------------------------------------------------------
# Generated images against a pack
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DiversitySettings:
    """One diversity probe: the generated images (or a model to sample them from), the real ones, the
    feature spaces, the output folder."""

    samples: Path
    """A `pixelrepa sample` folder or an .npz with labels, or a training run / checkpoint folder / model
    file to sample from."""
    data: Path
    """The real images: a pack folder."""
    out: Path = Path("probe-diversity")
    """Folder for diversity.csv, diversity.json, diversity.png and collapsed.png."""
    per_class: int | None = None
    """Generated images per class; None: all of a folder's, 16 drawn from a model."""
    real_per_class: int = 50
    """Real images per class, a seeded draw."""
    classes: tuple[int, ...] | None = None
    """Class indices; None: every class in both sets (from a model: the pack's)."""
    spaces: tuple[str, ...] = SPACES
    """Feature spaces; the first ranks the collapse."""
    encoder: str | None = None
    """A registered encoder preset; None: the run's align.encoder."""
    encoder_weights: Path | None = None
    """A local weights file for the encoder."""
    ema: Ema = None
    """Sampling from a training run: its weights (see `pixelrepa.loading`)."""
    sampler: dict[str, object] = field(default_factory=dict)
    """Sampling from a model: changes to its SamplerConfig by field name."""
    top: int = DEFAULT_TOP
    """Most-collapsed classes listed and shown."""
    batch_size: int = 64
    seed: int = 0
    """The sampling noise and the real subset."""


@dataclass(frozen=True)
class DiversityResult:
    rows: list[dict]
    summary: dict
    spaces: list[str]
    record: dict
    """diversity.json without `summary` and `results` (the rows)."""


def is_sample_source(path: Path) -> bool:
    """A `pixelrepa sample` folder or an .npz of images, rather than a model to sample from."""
    if path.is_file():
        return path.suffix == ".npz"
    return ((path / MANIFEST_NAME).is_file() and (path / IMAGES_DIR).is_dir()) or (path / NPZ_NAME).is_file()


def sample_folder_config(path: Path) -> RunConfig | None:
    """The run config of the model a sample folder's manifest names, or None when it is not readable."""
    from pixelrepa.weights import load_model_file

    try:
        model = Path(json.loads((path / MANIFEST_NAME).read_text())["model"])
        return load_model_file(model)[0]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_diversity(settings: DiversitySettings, device: torch.device) -> DiversityResult:
    """Measure the generated images of `settings.samples` (sampled on `device` from a model) against the
    pack and write the outputs; progress goes to stderr."""
    from pixelrepa.align.encoders import build_encoder
    from pixelrepa.evaluation.features import EncoderFeatures, _own_grid, build_feature_extractor
    from pixelrepa.models.layers import set_attention_impl
    from pixelrepa.sampling import sample_classes

    for flag, value, least in (("--batch-size", settings.batch_size, 1), ("--top", settings.top, 1),
                               ("--real-per-class", settings.real_per_class, 2),
                               ("--per-class", settings.per_class, 2)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    spaces = list(dict.fromkeys(settings.spaces))
    samples = Path(settings.samples)
    if not samples.exists():
        raise FileNotFoundError(f"no sample folder, .npz, model file or training run at {samples}")
    real = ImageSet.from_pack(settings.data)

    if is_sample_source(samples):
        if settings.ema is not None or settings.sampler:
            raise ValueError(f"{samples} holds samples already: --ema and the sampler flags apply only when "
                             "sampling from a model or run; leave them out")
        generated = ImageSet.from_samples(samples)
        config = sample_folder_config(samples) if samples.is_dir() else None
        classes = common_classes(generated.labels, real.labels, settings.classes)
        gen_source = generated.source
    else:
        config, net, model_source = load_model(samples, settings.ema, device)
        config = apply_overrides(config, {f"sampler.{name}": value for name, value in settings.sampler.items()})
        in_model = np.arange(config.model.num_classes)
        classes = common_classes(in_model, real.labels, settings.classes)
        per_class = 16 if settings.per_class is None else settings.per_class
        for c in classes:  # refuse before sampling
            check_class_counts(c, per_class, min(int((real.labels == c).sum()), settings.real_per_class))
        set_attention_impl(net, config.kernels.attention)
        print(f"sampling {len(classes)} classes x {per_class} ({config.sampler.method} {config.sampler.steps} steps, "
              f"CFG {config.sampler.cfg_scale}, seed {settings.seed})", file=sys.stderr)
        images = sample_classes(net, config, classes, per_class, settings.seed, device, settings.batch_size)
        del net
        labels = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
        gen_source = {"kind": "sampled", "model": model_source, "per_class": per_class, "seed": settings.seed,
                      "sampler": dataclasses.asdict(config.sampler)}
        generated = ImageSet.from_tensor(images, labels, gen_source)

    gen_index = select_per_class(generated.labels, classes, settings.per_class, settings.seed)
    real_index = select_per_class(real.labels, classes, settings.real_per_class, settings.seed)
    for c in classes:
        check_class_counts(c, int((generated.labels[gen_index] == c).sum()), int((real.labels[real_index] == c).sum()))

    encoder_record = None
    extractors = {}
    if "encoder" in spaces:
        if settings.encoder is not None:
            encoder_cfg, found = get_encoder_preset(settings.encoder), "--encoder"
        elif config is not None:
            encoder_cfg, found = config.align.encoder, "run config"
        else:
            raise ValueError(f"no run config to take align.encoder from for {samples}: pass --encoder PRESET "
                             f"({', '.join(sorted(ENCODER_PRESETS))}), or --spaces inception")
        if settings.encoder_weights is not None:
            if not settings.encoder_weights.is_file():
                raise FileNotFoundError(f"encoder weights file not found: {settings.encoder_weights}")
            encoder_cfg = dataclasses.replace(encoder_cfg, weights=str(settings.encoder_weights.resolve()))
        try:
            encoder = build_encoder(encoder_cfg)
        except RuntimeError as err:  # weights not reachable (offline)
            raise ValueError(f"encoder '{encoder_cfg.name}': {err}; pass --encoder-weights FILE") from err
        extractors["encoder"] = EncoderFeatures(encoder, _own_grid(encoder)).to(device).eval()
        encoder_record = dataclasses.asdict(encoder_cfg) | {"from": found}
    inception_record = None
    if "inception" in spaces:
        extractors["inception"], inception_record = build_feature_extractor("inception", device)

    results = {}
    for space in spaces:
        with tqdm(total=len(gen_index) + len(real_index), desc=f"features ({space})", unit="img",
                  dynamic_ncols=True, disable=None) as bar:
            gen_features = extract(extractors[space], generated, gen_index, settings.batch_size, device, bar.update)
            real_features = extract(extractors[space], real, real_index, settings.batch_size, device, bar.update)
        results[space] = class_metrics(gen_features, generated.labels[gen_index], real_features,
                                       real.labels[real_index], classes)
    rows = table_rows(results, real.class_names)
    summary = summarise(rows, spaces, settings.top)
    record = {
        "format": DIVERSITY_FORMAT,
        "generated": {**gen_source, "used": len(gen_index)},
        "real": {**real.source, "used": len(real_index), "per_class": settings.real_per_class},
        "encoder": encoder_record,
        "inception": inception_record,
        "settings": {"spaces": spaces, "classes": classes, "k": PR_NEIGHBORHOOD, "top": settings.top,
                     "seed": settings.seed, "normalisation": NORMALISATION, "batch_size": settings.batch_size,
                     "device": str(device)},
        "created": created(),
    }
    write_outputs(settings.out, record, rows, summary, spaces)
    collapsed_grid(generated, gen_index, real, real_index, summary["most_collapsed"], settings.out / "collapsed.png")
    return DiversityResult(rows, summary, spaces, record)
