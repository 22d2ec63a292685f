"""The evaluation of image sources against a reference (`pixelrepa eval`), reference statistics
(`pixelrepa eval ref-stats`) and reproduction bands over several sources.

`evaluate(EvalSettings(samples=(S,), ref=REF, metrics=...), device)` gives one JSON record: every
setting, the sources, the feature network and its weights, which weights produced each number
(`weights`), the metrics (`metrics.score`), warnings and timing. Several sources (one per sampling
seed) are each scored against the same reference, read or computed once, with the networks built
once; the record then has `runs` (per source: its description, the sampling seed from its
manifest.json when it is a `pixelrepa sample` folder, else None, its metrics, warnings and timing) and
`bands`: for every scalar metric the mean, the sample standard deviation over the sources (ddof 1)
and n. The sources must hold the same number of images: a band describes the sampling noise at one N.
Under torchrun (`world`) the images are split across the ranks and rank 0 gets the record; the other
ranks get None.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pixelrepa.evaluation import features as feature_networks
from pixelrepa.evaluation.features import check_count, features_of, is_image_npz
from pixelrepa.evaluation.metrics import (
    DEFAULTS,
    FID_EPS,
    PR_NEIGHBORHOOD,
    ImageSource,
    Reference,
    ScoreSettings,
    feature_statistics,
    load_reference,
    save_reference,
    score,
)
from pixelrepa.evaluation.sample_folder import MANIFEST_FORMAT, MANIFEST_NAME
from pixelrepa.evaluation.sweep import BAND_DDOF, band
from pixelrepa.files import created

RESULT_FORMAT = "pixelrepa-eval/1"


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation: the sources, the reference, the metrics and the feature network."""

    samples: tuple[Path, ...]
    """Image sources (see `metrics.ImageSource`), one per sampling seed for bands."""
    ref: Path
    """Reference statistics .npz (`reference_stats`) or an image source."""
    metrics: tuple[str, ...] = ("fid",)
    """Of `metrics.METRICS`, each once."""
    batch_size: int = 50
    max_images: int | None = None
    """Use only the first N images of each source."""
    scores: ScoreSettings = DEFAULTS
    features: str = feature_networks.INCEPTION
    """`inception` or `encoder:NAME` (see `pixelrepa.evaluation.features`)."""
    encoder_weights: str | None = None
    inception_weights: str | None = None
    """torch-fidelity's classifier weights for the Inception Score; None: its download cache."""


@dataclass(frozen=True)
class RefStatsSettings:
    """Reference statistics of an image source: `mu`, `sigma` and, with `keep_features`, the features."""

    src: Path
    out: Path
    keep_features: bool = False
    batch_size: int = 50
    max_images: int | None = None
    features: str = feature_networks.INCEPTION
    encoder_weights: str | None = None


def reference_stats(settings: RefStatsSettings, device: torch.device,
                    world=None) -> tuple[tuple[int, int], float] | None:
    """Write the statistics of `settings.src` to `settings.out` with a `meta` record; the (images, dimension)
    of the features and the seconds spent on them (None on ranks other than 0)."""
    source = ImageSource(settings.src, settings.max_images)
    check_count(len(source), "SRC")
    extractor, network = feature_networks.build_feature_extractor(settings.features, device, settings.encoder_weights)
    features, seconds = features_of(source, extractor, settings.batch_size, device, "reference", world)
    if features is None:  # not rank 0
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mu, sigma = feature_statistics(features)
    meta = {"format": RESULT_FORMAT, "source": source.describe(), "feature_network": network, "created": created()}
    reference = Reference(mu, sigma, features if settings.keep_features else None, meta)
    save_reference(settings.out, reference)
    report(caught)
    return features.shape, seconds


def evaluate(settings: EvalSettings, device: torch.device, world=None) -> dict | None:
    """The JSON record of the evaluation of each source against one reference (see the module docstring);
    None on ranks other than 0."""
    metrics = list(dict.fromkeys(settings.metrics))
    sources = [ImageSource(p, settings.max_images) for p in settings.samples]
    check_equal_counts(sources)
    network_id, feature_dim = feature_networks.identify(settings.features, settings.encoder_weights)
    reference, ref_source, ref_info = _reference(settings, network_id, feature_dim, bool({"kid", "pr"} & set(metrics)))
    is_splits = settings.scores.is_splits
    found = feature_networks.resolve_classifier(metrics, settings.inception_weights)
    on_features = [m for m in metrics if m != "is"]  # the reference serves these; IS is of the samples alone
    check_count(len(sources[0]), "SAMPLES", metrics if found else on_features, is_splits)
    if ref_source is not None:
        check_count(len(ref_source), "REF", on_features)
    elif reference.features is not None:
        check_count(len(reference.features), "REF features", on_features)
    seeds, source_notes = source_seeds(list(settings.samples))

    extractor, network = feature_networks.build_feature_extractor(settings.features, device, settings.encoder_weights)
    classifier, samples_net = None, extractor
    if found is not None:
        classifier_net, classifier = feature_networks.build_classifier(found, device)
        samples_net = feature_networks.WithClassifier(extractor, classifier_net)
    timing: dict[str, float] = {}
    ref_notes: list[str] = []
    if ref_source is not None:
        ref_features, ref_seconds = features_of(ref_source, extractor, settings.batch_size, device, "reference",
                                                world)
        if ref_features is not None and reference is not None:  # a file's reference batch: features only
            reference.features = ref_features
        elif ref_features is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                reference = Reference(*feature_statistics(ref_features), ref_features)
            report(caught)
            ref_notes = [str(w.message) for w in caught]
        timing["reference_seconds"] = round(ref_seconds, 3)
    runs = []
    for samples, seed in zip(sources, seeds):  # every rank runs every source: the extraction is collective
        features, seconds = features_of(samples, samples_net, settings.batch_size, device, "samples", world)
        if features is None:  # not rank 0
            continue
        logits = None
        if classifier is not None:
            features, logits = samples_net.split(features)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = score(features, reference, metrics, settings.scores, logits)
        report(caught)
        notes = [str(w.message) for w in caught]
        if classifier is not None:
            values["is"] |= {"weights": classifier["weights"], "weights_sha256": classifier["sha256"]}
            if not classifier["matches_published"]:
                notes.append(feature_networks.unpublished_note(classifier))
                print(f"warning: {notes[-1]}", file=sys.stderr)
        runs.append({"samples": samples.describe(), "seed": seed, "metrics": values,
                     "warnings": ref_notes + notes,  # the reference's warnings belong to every evaluation
                     "timing": {"samples_seconds": round(seconds, 3),
                                "seconds_per_image": round(seconds / len(features), 4)}})
    if not runs:  # not rank 0
        return None
    s = settings.scores
    record = {
        "format": RESULT_FORMAT,
        "samples": runs[0]["samples"],
        "reference": ref_info,
        "feature_network": network,
        "classifier": classifier,
        "weights": feature_networks.weights_by_metric(metrics, network, classifier),
        "settings": {"metrics": metrics, "features": settings.features, "batch_size": settings.batch_size,
                     "max_images": settings.max_images, "device": str(device), "fid_eps": FID_EPS,
                     "kid_subsets": s.kid_subsets, "kid_subset_size": s.kid_subset_size, "seed": s.kid_seed,
                     "pr_neighborhood": PR_NEIGHBORHOOD, "is_splits": s.is_splits,
                     "inception_weights": settings.inception_weights,
                     "world_size": world.world_size if world is not None else 1},
        "metrics": runs[0]["metrics"],
        "warnings": runs[0]["warnings"],
        "timing": {**runs[0]["timing"], **timing},
        "created": created(),
    }
    if len(runs) == 1:
        return record
    for note in source_notes:
        print(f"warning: {note}", file=sys.stderr)
    warned = list(dict.fromkeys(source_notes + [n for run in runs for n in run["warnings"]]))
    del record["metrics"]
    return record | {
        "samples": [run["samples"] for run in runs],
        "warnings": warned,
        "timing": {"samples_seconds": round(sum(r["timing"]["samples_seconds"] for r in runs), 3), **timing},
        "runs": runs,
        "bands": bands(runs),
        "band_std": f"sample standard deviation over the sources (ddof={BAND_DDOF})",
        "created": record["created"],
    }


def _reference(settings: EvalSettings, network_id: str, feature_dim: int,
               needs_features: bool) -> tuple[Reference | None, ImageSource | None, dict]:
    """(statistics, None, record) of a statistics file, checked; (None, source, record) of reference images;
    (statistics, its reference batch, record) of a file whose `arr_0` gives the features KID and
    precision / recall need (ADM's)."""
    path = settings.ref
    if not (path.is_file() and path.suffix == ".npz" and not is_image_npz(path)):
        source = ImageSource(path, settings.max_images)
        return None, source, source.describe()
    reference = load_reference(path)
    feature_networks.check_reference(path, reference, network_id, feature_dim)
    batch = feature_networks.reference_batch(path, reference) if needs_features else None
    count = len(reference.features) if reference.features is not None else len(batch) if batch else None
    return reference, batch, {"path": str(path.resolve()), "kind": "statistics", "count": count,
                              "reference_batch": batch is not None, "made_by": reference.meta}


def report(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Reproduction bands over several sources
# ---------------------------------------------------------------------------

BAND_METRICS = (("fid", ("fid",)), ("kid", ("kid", "mean")), ("precision", ("pr", "precision")),
                ("recall", ("pr", "recall")), ("is", ("is", "value")))
"""The scalar metrics banded: (name in `bands`, its path in a run's metrics)."""
BAND_NAMES = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "is": "IS"}


def check_equal_counts(sources: list[ImageSource]) -> None:
    """Refuse sources of different image counts: a band describes the sampling noise at one N."""
    counts = [len(s) for s in sources]
    if len(set(counts)) > 1:
        listed = ", ".join(f"{s.path} {n}" for s, n in zip(sources, counts))
        raise ValueError(f"the SAMPLES hold different numbers of images ({listed}): mean ± std over seeds is only "
                         f"meaningful at one N; pass --max-images {min(counts)} to use the first {min(counts)} of each")


def source_seeds(paths: list[Path]) -> tuple[list[int | None], list[str]]:
    """The sampling seed of each `pixelrepa sample` folder (from its manifest.json; None for other sources),
    and warnings about sources that are no independent draws (a repeated path or seed) or differ in more
    than the seed (manifests with other settings)."""
    seeds, settings, notes = [], [], []
    for path in paths:
        manifest = None
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            try:
                manifest = json.loads((path / MANIFEST_NAME).read_text())
            except ValueError:
                manifest = None
        if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
            seeds.append(manifest["settings"].get("seed"))
            settings.append({k: v for k, v in manifest["settings"].items() if k != "seed"})
        else:
            seeds.append(None)
            settings.append(None)
    if len(paths) > 1:
        resolved = [p.resolve() for p in paths]
        if len(set(resolved)) < len(resolved):
            notes.append("a SAMPLES source is given more than once: its copies add no sampling noise to the band")
        known = [s for s in seeds if s is not None]
        if len(set(known)) < len(known):
            notes.append(f"SAMPLES share sampling seeds ({' '.join(map(str, seeds))}): the band is not the sampling "
                         "noise over independent seeds")
        made = [s for s in settings if s is not None]
        if any(s != made[0] for s in made):
            notes.append("the SAMPLES' manifests differ in more than the seed (model or sampler settings): the band "
                         "mixes settings")
    return seeds, notes


def run_values(run: dict) -> dict[str, float | None]:
    """The scalar metrics of one run, by BAND_METRICS name (None when not computed or unavailable)."""
    values = {}
    for name, path in BAND_METRICS:
        value = run["metrics"]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if path[0] in run["metrics"]:
            values[name] = value
    return values


def bands(runs: list[dict]) -> dict[str, dict | None]:
    """For every scalar metric of the runs: mean, sample std (ddof 1) and n over the runs that have it."""
    per_run = [run_values(run) for run in runs]
    return {name: band(values.get(name) for values in per_run) for name in per_run[0]}


def format_bands(bands: dict[str, dict | None]) -> str:
    """One line per metric: `FID 12.3 ± 0.4 (3 seeds, sample std)`."""
    lines = []
    for name, b in bands.items():
        if b is None:
            lines.append(f"{BAND_NAMES.get(name, name)}: unavailable")
        else:
            std = "" if b["std"] is None else f" ± {b['std']:.2g}"
            lines.append(f"{BAND_NAMES.get(name, name)} {b['mean']:.4g}{std} ({b['n']} seeds, sample std)")
    return "\n".join(lines)
