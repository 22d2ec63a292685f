"""Evaluate samples against a reference: FID, KID, precision / recall with the offline FID Inception-v3,
and the Inception Score where torch-fidelity's classifier weights are present.

  pixelrepa eval SAMPLES [SAMPLES ...] --ref REF [--metrics fid kid pr is] [--inception-weights PATH] [--out result.json]
  pixelrepa eval ref-stats SRC OUT.npz [--keep-features]
  pixelrepa eval sweep MODEL --ref REF.npz --cfg 1.0 1.5 2.0 [--ema 1 2] [--steps 50 ...] [--seeds 0 1 2]
                 --num-images N --out DIR

SAMPLES and SRC are a folder of PNGs, a `pixelrepa sample` output folder (its images/), an ADM
.npz (`arr_0` uint8 (N, H, W, 3)) or a pack folder; REF is a statistics .npz (`mu` (2048,),
`sigma` (2048, 2048): from `ref-stats`, with `features` under --keep-features, which KID and
precision / recall need; an ADM reference batch works too) or an image source. Images are read
in batches; only features stay in memory. The result is one JSON record (stdout, and --out) with
every setting, the sources, the feature network and its weights, and which weights produced each
number (`weights`). The Inception Score (`is`, 10 splits) needs a classifier, which the packaged
network lacks: it comes from torch-fidelity's own `inception-v3-compat` weights, a file given with
`--inception-weights PATH` or found in torch-fidelity's download cache (torch hub's `checkpoints/`;
see `pixelrepa.evaluation.inception`); without one it is reported as unavailable, never as a number.
`--features encoder:NAME [--encoder-weights PATH]` uses a representation encoder preset (the mean of
its patch tokens; see `pixelrepa.evaluation.features`) instead of Inception; reference files record
their feature network and are refused by another one. Under torchrun the images are split across
the ranks and rank 0 computes and writes the result.

Reproduction bands: several SAMPLES (one source per sampling seed, e.g. `pixelrepa sample --seed s`
folders) are each evaluated as one source is, against the same reference (read or computed once,
the networks built once), and the record gains `runs` (per source: its description, the sampling
seed from its manifest.json when it is a `pixelrepa sample` folder, else null, its metrics, warnings
and timing) and `bands`: for every scalar metric (fid, kid: its mean over the subsets, precision,
recall, is) the mean, the sample standard deviation over the sources (ddof 1, numpy's
`np.std(values, ddof=1)`) and n. Its `samples` is then the list of the sources, and it has no
`metrics` (they are in `runs`). A summary such as `FID 12.3 ± 0.4 (3 seeds)` goes to stderr, the
JSON to stdout as with one source. The sources must hold the same number of images (after
--max-images): a band only describes the sampling noise at one N, so mixed counts are refused (pass
--max-images to cut them to one N). Sources that share a seed or a path, or whose manifests differ
in more than the seed, are evaluated with a warning: their spread is not (only) the sampling noise.
With one source the record is exactly the single-evaluation one above.
`sweep` samples N images per (EMA, steps, CFG) setting in memory and writes FID / KID tables and
a plot to DIR (see `pixelrepa.evaluation.sweep`); `--seeds 0 1 2` (instead of `--seed`) samples
each setting once per seed and reports each metric as mean and std over the seeds.
(A sample folder literally named `ref-stats` or `sweep` is given as ./ref-stats or ./sweep.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from pixelrepa.evaluation import features as feature_networks
from pixelrepa.evaluation import inception, sweep
from pixelrepa.evaluation.features import check_count, features_of, is_image_npz
from pixelrepa.evaluation.sample_folder import MANIFEST_FORMAT, MANIFEST_NAME
from pixelrepa.evaluation.metrics import (
    FID_EPS,
    PR_NEIGHBORHOOD,
    ImageSource,
    Reference,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_reference,
    precision_recall,
    save_reference,
)
from pixelrepa.files import created, write_text_atomic
from pixelrepa.device import pick_device

METRICS = ("fid", "kid", "pr", "is")
RESULT_FORMAT = "pixelrepa-eval/1"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("samples", metavar="SAMPLES", help="images to evaluate, or `ref-stats` or `sweep`")
    parser.add_argument("paths", nargs="*", metavar="SRC OUT.npz",
                        help="for an evaluation: more SAMPLES, one per sampling seed (mean ± std over them); "
                             "for `ref-stats`: image source and output file; for `sweep`: the model")
    parser.add_argument("--ref", type=Path, help="reference statistics .npz or image source (evaluation)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=["fid"], help="default: fid")
    parser.add_argument("--batch-size", type=int, default=50, help="images per network batch (default 50)")
    parser.add_argument("--max-images", type=int, help="use only the first N images of each source")
    parser.add_argument("--out", type=Path, help="also write the JSON record here (sweep: the output folder)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID subset size, capped at the smaller set (default 1000)")
    parser.add_argument("--seed", type=int, help="KID subset draws and IS split shuffle (default 2020, as "
                        "torch-fidelity); sweep: the sampling seed (default 0)")
    parser.add_argument("--keep-features", action="store_true",
                        help="ref-stats: also store the features (N x 2048 float32), for KID and precision / recall")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--features", default="inception", metavar="NET",
                        help="feature network: `inception` (default) or `encoder:NAME`, NAME an encoder preset "
                             "(dinov2-b, efficientnet-lite0, ...): the mean of its patch tokens (see "
                             "pixelrepa.evaluation.features)")
    parser.add_argument("--encoder-weights", metavar="PATH",
                        help="local weights file for --features encoder:NAME (needed offline for DINOv2)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help=f"torch-fidelity's {inception.EXTRACTOR_NAME} weights for the Inception Score "
                             f"({inception.CLASSIFIER_FILE}, or pytorch-fid's {inception.PYTORCH_FID_FILE}); "
                             "default: that file in torch hub's checkpoints/ folder when present")
    parser.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    group = parser.add_argument_group("sweep", "options of `pixelrepa eval sweep MODEL`")
    group.add_argument("--cfg", type=float, nargs="+", help="sweep: CFG scales (default: the model's)")
    group.add_argument("--ema", type=int, nargs="+", help="sweep: EMAs of a training run (default 1)")
    group.add_argument("--steps", type=int, nargs="+", help="sweep: sampler step counts (default: the model's)")
    group.add_argument("--method", choices=["heun", "euler"], help="sweep: sampler (default: the model's)")
    group.add_argument("--interval", type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="sweep: guidance interval (default: the model's)")
    group.add_argument("--num-images", type=int, help="sweep: images per setting")
    group.add_argument("--per-class", type=int,
                       help="sweep: consecutive images per class (default: N spread over every class)")
    group.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                       help="sweep: sampling seeds, each setting sampled once per seed and reported as mean and "
                            "sample std (ddof 1) over them; not with --seed")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else pick_device()
    if args.samples == "ref-stats":
        if len(args.paths) != 2:
            raise ValueError("usage: pixelrepa eval ref-stats SRC OUT.npz")
        return in_process_group(args, device,
                                lambda d: reference_stats(Path(args.paths[0]), Path(args.paths[1]), args, d))
    if args.samples == "sweep":
        return run_sweep(sweep_settings(args), device)
    if getattr(args, "seeds", None) is not None:
        raise ValueError("--seeds is for `pixelrepa eval sweep`; for bands over sample folders pass one folder per "
                         "sampling seed: pixelrepa eval S0 S1 S2 --ref REF")
    if args.seed is None:
        args.seed = 2020
    if args.ref is None:
        raise ValueError("--ref REF is required: a reference statistics .npz or an image source")
    paths = [Path(args.samples), *map(Path, args.paths)]
    record = in_process_group(args, device, lambda d: evaluate_sources(paths, args.ref, args, d))
    if record is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    text = json.dumps(record, indent=2)
    print(text)
    if "bands" in record:
        print(format_bands(record["bands"]), file=sys.stderr)
    if args.out is not None:
        write_text_atomic(args.out, text + "\n")
    return 0


def in_process_group(args: argparse.Namespace, device: torch.device, work):
    """`work(device)` inside torchrun's process group (none for a single process), as `args.world`:
    feature extraction is split across the ranks, rank 0 computes and writes (the others get None)."""
    from pixelrepa.distributed import in_process_group as in_group

    def work_in(world):
        args.world = world
        return work(world.device if world.world_size > 1 and not args.device else device)

    return in_group(work_in)


def reference_stats(src: Path, out: Path, args: argparse.Namespace, device: torch.device) -> int:
    """Features of SRC -> `mu`, `sigma` (and `features`) in OUT, with a `meta` record."""
    if getattr(args, "inception_weights", None) is not None:
        raise ValueError("--inception-weights is for the Inception Score of an evaluation, not for ref-stats")
    source = ImageSource(src, args.max_images)
    check_count(len(source), "SRC")
    extractor, network = feature_networks.build_feature_extractor(
        getattr(args, "features", "inception"), device, getattr(args, "encoder_weights", None))
    features, seconds = features_of(source, extractor, args.batch_size, device, "reference",
                                    getattr(args, "world", None))
    if features is None:  # not rank 0
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mu, sigma = feature_statistics(features)
    meta = {"format": RESULT_FORMAT, "source": source.describe(), "feature_network": network,
            "created": created()}
    save_reference(out, Reference(mu, sigma, features if args.keep_features else None, meta))
    report_warnings(caught)
    print(f"wrote {out}: {len(features)} images, {features.shape[1]}-d statistics"
          f"{' and features' if args.keep_features else ''} ({seconds / len(features):.3f} s/image)")
    return 0


def evaluate(samples_path: Path, ref_path: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON record of one evaluation."""
    return evaluate_sources([samples_path], ref_path, args, device)


def evaluate_sources(samples_paths: list[Path], ref_path: Path, args: argparse.Namespace,
                     device: torch.device) -> dict | None:
    """The JSON record of the evaluation of each source against one reference: for one source the record of
    `evaluate`, for several also `runs` and `bands` (see the module docstring). None on ranks other than 0."""
    metrics = list(dict.fromkeys(args.metrics))
    sources = [ImageSource(p, args.max_images) for p in samples_paths]
    check_equal_counts(sources)
    needs_features = bool({"kid", "pr"} & set(metrics))
    spec, weights = getattr(args, "features", "inception"), getattr(args, "encoder_weights", None)
    network_id, feature_dim = feature_networks.identify(spec, weights)
    if ref_path.is_file() and ref_path.suffix == ".npz" and not is_image_npz(ref_path):
        reference, ref_source = load_reference(ref_path), None
        feature_networks.check_reference(ref_path, reference, network_id, feature_dim)
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
    is_splits = getattr(args, "is_splits", 10)
    found = feature_networks.resolve_classifier(metrics, getattr(args, "inception_weights", None))
    on_features = [m for m in metrics if m != "is"]  # the reference serves these; IS is of the samples alone
    check_count(len(sources[0]), "SAMPLES", metrics if found else on_features, is_splits)
    if ref_source is not None:
        check_count(len(ref_source), "REF", on_features)
    elif reference.features is not None:
        check_count(len(reference.features), "REF features", on_features)
    seeds, source_notes = source_seeds(samples_paths)

    extractor, network = feature_networks.build_feature_extractor(spec, device, weights)
    classifier = None
    samples_net = extractor
    if found is not None:
        classifier_net, classifier = feature_networks.build_classifier(found, device)
        samples_net = feature_networks.WithClassifier(extractor, classifier_net)
    world = getattr(args, "world", None)
    timing: dict[str, float] = {}
    if reference is None:
        ref_features, ref_seconds = features_of(ref_source, extractor, args.batch_size, device, "reference",
                                                world)
        if ref_features is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                reference = Reference(*feature_statistics(ref_features), ref_features)
            report_warnings(caught)
            ref_notes = [str(w.message) for w in caught]
            timing["reference_seconds"] = round(ref_seconds, 3)
    runs = []
    for samples, seed in zip(sources, seeds):  # every rank runs every source: the extraction is collective
        features, seconds = features_of(samples, samples_net, args.batch_size, device, "samples", world)
        if features is None:  # not rank 0
            continue
        values, notes = score(features, reference, metrics, found is not None, samples_net, classifier, is_splits,
                              args)
        runs.append({"samples": samples.describe(), "seed": seed, "metrics": values, "warnings": notes,
                     "timing": {"samples_seconds": round(seconds, 3),
                                "seconds_per_image": round(seconds / len(features), 4)}})
    if not runs:  # not rank 0
        return None
    if reference is not None and ref_source is not None:
        for run in runs:  # the reference's warnings (a small set) belong to every evaluation against it
            run["warnings"] = ref_notes + run["warnings"]
    record = {
        "format": RESULT_FORMAT,
        "samples": runs[0]["samples"],
        "reference": ref_info,
        "feature_network": network,
        "classifier": classifier,
        "weights": feature_networks.weights_by_metric(metrics, network, classifier),
        "settings": {"metrics": metrics, "features": spec, "batch_size": args.batch_size, "max_images": args.max_images,
                     "device": str(device), "fid_eps": FID_EPS, "kid_subsets": args.kid_subsets,
                     "kid_subset_size": args.kid_subset_size, "seed": args.seed, "pr_neighborhood": PR_NEIGHBORHOOD,
                     "is_splits": is_splits, "inception_weights": getattr(args, "inception_weights", None),
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
        "band_std": f"sample standard deviation over the sources (ddof={sweep.BAND_DDOF})",
        "created": record["created"],
    }


def score(features, reference: Reference, metrics: list[str], with_classifier: bool, samples_net, classifier,
          is_splits: int, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The metrics of one source's features (with the classifier logits when `with_classifier`), and the notes."""
    logits = None
    if with_classifier:
        features, logits = samples_net.split(features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
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
    notes = [str(w.message) for w in caught]
    if "is" in metrics:
        if logits is None:
            values["is"] = {"value": None, "available": False, "reason": inception.classifier_missing_reason()}
        else:
            values["is"] = inception_score(logits, is_splits, args.seed) | {"weights": classifier["weights"],
                                                                            "weights_sha256": classifier["sha256"]}
            if not classifier["matches_published"]:
                notes.append(f"the Inception Score weights {classifier['weights']} are not torch-fidelity's published "
                             f"file (SHA-256 {classifier['sha256'][:8]}..., not "
                             f"{inception.PUBLISHED_SHA256_PREFIX}...): the score is not comparable with published ones")
                print(f"warning: {notes[-1]}", file=sys.stderr)
    return values, notes


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
    return {name: sweep.band(values.get(name) for values in per_run) for name in per_run[0]}


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


def report_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def sweep_settings(args: argparse.Namespace) -> sweep.SweepSettings:
    """`eval sweep`'s arguments, checked, as the library's settings (each list without repeats)."""
    if len(args.paths) != 1:
        raise ValueError("usage: pixelrepa eval sweep MODEL --ref REF.npz --cfg ... --num-images N --out DIR")
    if args.seed is not None and args.seeds is not None:
        raise ValueError("--seed and --seeds are mutually exclusive: --seed S samples once with S, "
                         "--seeds S1 S2 ... once per seed (mean and std over them)")
    metrics = tuple(dict.fromkeys(args.metrics))
    unsupported = [m for m in metrics if m not in sweep.SWEEP_METRICS]
    if unsupported:
        raise ValueError(f"a sweep computes {', '.join(sweep.SWEEP_METRICS)}, not {', '.join(unsupported)}; "
                         "evaluate a sample folder with `pixelrepa eval` for that")
    if args.ref is None and {"fid", "kid"} & set(metrics):
        raise ValueError("--ref REF.npz is required: reference statistics (from `pixelrepa eval ref-stats`)")
    if args.features != "inception":
        raise ValueError(f"a sweep uses the Inception features, not --features {args.features}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a sweep runs in one process: start it without torchrun")
    if args.out is None:
        raise ValueError("--out DIR is required: the folder for sweep.csv, sweep.md, sweep.json and sweep.png")
    if args.num_images is None or args.num_images < 2:
        raise ValueError(f"--num-images N >= 2 is required (the covariance needs 2 images), got {args.num_images}")
    if "is" in metrics and (args.is_splits < 1 or args.num_images < args.is_splits):
        raise ValueError(f"the Inception Score in --is-splits {args.is_splits} needs splits >= 1 and --num-images of "
                         f"at least {max(args.is_splits, 1)}, got {args.num_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    emas = tuple(dict.fromkeys(args.ema or [1]))
    if any(e < 1 for e in emas):
        raise ValueError(f"EMA indices start at 1, got {list(emas)}")
    steps = tuple(dict.fromkeys(args.steps)) if args.steps else None
    if steps and any(s < 1 for s in steps):
        raise ValueError(f"steps must be >= 1, got {list(steps)}")
    return sweep.SweepSettings(
        model=Path(args.paths[0]), out=args.out, num_images=args.num_images, ref=args.ref, metrics=metrics,
        emas=emas, steps=steps, cfg=tuple(dict.fromkeys(args.cfg)) if args.cfg else None, method=args.method,
        interval=tuple(args.interval) if args.interval else None, per_class=args.per_class,
        batch_size=args.batch_size, seed=0 if args.seed is None else args.seed,
        seeds=tuple(dict.fromkeys(args.seeds)) if args.seeds else None, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, is_splits=args.is_splits, inception_weights=args.inception_weights)


def run_sweep(settings: sweep.SweepSettings, device: torch.device) -> int:
    """Run the sweep; print its table and best setting."""
    record = sweep.run(settings, device)
    print(sweep.format_markdown(record["results"]))
    print(f"best: {sweep.describe_row(record['best'])} ({sweep.best_criterion(record['results'])})")
    print(f"wrote {settings.out / 'sweep.csv'}, sweep.md, sweep.json, sweep.png")
    return 0
