"""Evaluate samples against a reference: FID, KID, precision / recall with the offline FID Inception-v3.

  pixelrepa eval SAMPLES --ref REF [--metrics fid kid pr is] [--out result.json]
  pixelrepa eval ref-stats SRC OUT.npz [--keep-features]

SAMPLES and SRC are a folder of PNGs, a `pixelrepa sample` output folder (its images/), an ADM
.npz (`arr_0` uint8 (N, H, W, 3)) or a pack folder; REF is a statistics .npz (`mu` (2048,),
`sigma` (2048, 2048): from `ref-stats`, with `features` under --keep-features, which KID and
precision / recall need; an ADM reference batch works too) or an image source. Images are read
in batches; only features stay in memory. The result is one JSON record (stdout, and --out) with
every setting, the sources, the feature network and its weights. The Inception Score is reported
as unavailable: the offline network has no classifier.
(A sample folder literally named `ref-stats` is given as ./ref-stats.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixelrepa import __version__
from pixelrepa.evaluation import inception
from pixelrepa.evaluation.metrics import (
    FID_EPS,
    ImageSource,
    Reference,
    extract_features,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    load_reference,
    precision_recall,
    save_reference,
)
from pixelrepa.training.device import pick_device

METRICS = ("fid", "kid", "pr", "is")
RESULT_FORMAT = "pixelrepa-eval/1"
PR_NEIGHBORHOOD = 3


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("samples", metavar="SAMPLES", help="images to evaluate, or `ref-stats`")
    parser.add_argument("paths", nargs="*", metavar="SRC OUT.npz", help="for `ref-stats`: image source and output file")
    parser.add_argument("--ref", type=Path, help="reference statistics .npz or image source (evaluation)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=["fid"], help="default: fid")
    parser.add_argument("--batch-size", type=int, default=50, help="images per network batch (default 50)")
    parser.add_argument("--max-images", type=int, help="use only the first N images of each source")
    parser.add_argument("--out", type=Path, help="also write the JSON record here")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID subset size, capped at the smaller set (default 1000)")
    parser.add_argument("--seed", type=int, default=2020, help="KID subset draws (default 2020, as torch-fidelity)")
    parser.add_argument("--keep-features", action="store_true",
                        help="ref-stats: also store the features (N x 2048 float32), for KID and precision / recall")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else pick_device()
    if args.samples == "ref-stats":
        if len(args.paths) != 2:
            raise ValueError("usage: pixelrepa eval ref-stats SRC OUT.npz")
        return reference_stats(Path(args.paths[0]), Path(args.paths[1]), args, device)
    if args.paths:
        raise ValueError(f"unexpected arguments: {' '.join(args.paths)}")
    if args.ref is None:
        raise ValueError("--ref REF is required: a reference statistics .npz or an image source")
    record = evaluate(Path(args.samples), args.ref, args, device)
    text = json.dumps(record, indent=2)
    print(text)
    if args.out is not None:
        write_text_atomic(args.out, text + "\n")
    return 0


def reference_stats(src: Path, out: Path, args: argparse.Namespace, device: torch.device) -> int:
    """Features of SRC -> `mu`, `sigma` (and `features`) in OUT, with a `meta` record."""
    source = ImageSource(src, args.max_images)
    check_count(len(source), "SRC")
    features, seconds = features_of(source, inception.load_extractor(device), args.batch_size, device, "reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mu, sigma = feature_statistics(features)
    meta = {"format": RESULT_FORMAT, "source": source.describe(), "feature_network": inception.describe(),
            "created": created()}
    save_reference(out, Reference(mu, sigma, features if args.keep_features else None, meta))
    report_warnings(caught)
    print(f"wrote {out}: {len(features)} images, {features.shape[1]}-d statistics"
          f"{' and features' if args.keep_features else ''} ({seconds / len(features):.3f} s/image)")
    return 0


def evaluate(samples_path: Path, ref_path: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON record of one evaluation."""
    metrics = list(dict.fromkeys(args.metrics))
    samples = ImageSource(samples_path, args.max_images)
    needs_features = bool({"kid", "pr"} & set(metrics))
    if ref_path.is_file() and ref_path.suffix == ".npz" and not _is_image_npz(ref_path):
        reference, ref_source = load_reference(ref_path, inception.FEATURE_DIM), None
        if needs_features and reference.features is None:
            raise ValueError(f"{ref_path} holds only mu and sigma; KID and precision / recall need reference "
                             "features: make it with `pixelrepa eval ref-stats SRC OUT.npz --keep-features`, "
                             "or pass the reference images")
        ref_info = {"path": str(ref_path.resolve()), "kind": "statistics",
                    "count": None if reference.features is None else len(reference.features),
                    "made_by": reference.meta}
    else:
        ref_source, reference = ImageSource(ref_path, args.max_images), None
        ref_info = ref_source.describe()
    check_count(len(samples), "SAMPLES", metrics)
    if ref_source is not None:
        check_count(len(ref_source), "REF", metrics)
    elif reference.features is not None:
        check_count(len(reference.features), "REF features", metrics)

    extractor = inception.load_extractor(device)
    features, seconds = features_of(samples, extractor, args.batch_size, device, "samples")
    timing = {"samples_seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(features), 4)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if reference is None:
            ref_features, ref_seconds = features_of(ref_source, extractor, args.batch_size, device, "reference")
            timing["reference_seconds"] = round(ref_seconds, 3)
            reference = Reference(*feature_statistics(ref_features), ref_features)
        mu, sigma = feature_statistics(features)
    report_warnings(caught)

    values: dict[str, object] = {}
    if "fid" in metrics:
        values["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if "kid" in metrics:
        values["kid"] = kernel_inception_distance(features, reference.features, args.kid_subsets,
                                                  args.kid_subset_size, args.seed)
    if "pr" in metrics:
        values["pr"] = precision_recall(features, reference.features, PR_NEIGHBORHOOD)
    if "is" in metrics:
        values["is"] = {"value": None, "available": False, "reason": inception.INCEPTION_SCORE_UNAVAILABLE}
    return {
        "format": RESULT_FORMAT,
        "samples": samples.describe(),
        "reference": ref_info,
        "feature_network": inception.describe(),
        "settings": {"metrics": metrics, "batch_size": args.batch_size, "max_images": args.max_images,
                     "device": str(device), "fid_eps": FID_EPS, "kid_subsets": args.kid_subsets,
                     "kid_subset_size": args.kid_subset_size, "seed": args.seed, "pr_neighborhood": PR_NEIGHBORHOOD},
        "metrics": values,
        "warnings": [str(w.message) for w in caught],
        "timing": timing,
        "created": created(),
    }


def check_count(count: int, name: str, metrics: list[str] | None = None) -> None:
    """Refuse, before any network pass, a source too small for the statistics or the metrics."""
    if metrics and "pr" in metrics and count <= PR_NEIGHBORHOOD:
        raise ValueError(f"{name} has {count} image(s); precision / recall (k = {PR_NEIGHBORHOOD}) needs at least "
                         f"{PR_NEIGHBORHOOD + 1}")
    if count < 2:
        raise ValueError(f"{name} has {count} image(s); the covariance needs at least 2")


def features_of(source: ImageSource, extractor: torch.nn.Module, batch_size: int, device: torch.device,
                label: str) -> tuple[np.ndarray, float]:
    """Features of a source with the offline Inception-v3, and the seconds spent."""
    start = time.perf_counter()
    with tqdm(total=len(source), desc=f"features ({label})", unit="img", dynamic_ncols=True, disable=None) as bar:
        features = extract_features(source, extractor, batch_size, device, bar.update)
    return features, time.perf_counter() - start


def _is_image_npz(path: Path) -> bool:
    """Images (`arr_0`) rather than statistics; a file with both (the ADM reference batches) counts as statistics."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return "arr_0.npy" in names and "mu.npy" not in names
    except zipfile.BadZipFile:
        return False


def report_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def created() -> dict:
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pixelrepa": __version__,
            "torch": torch.__version__}


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
