"""Sampler sweeps: FID / KID (and the Inception Score) of a model over EMA x steps x CFG scale, in one process.

  pixelrepa eval sweep MODEL --ref REF.npz --cfg 1.0 1.5 2.0 [--ema 1 2] [--steps 50 ...]
                       --num-images N [--per-class K] [--batch-size B] [--seed S] --out DIR
                       [--metrics fid kid is] [--inception-weights PATH]

MODEL is a training run (or checkpoint) folder, whose EMAs `--ema` picks, or a model file (or a
folder holding `model.safetensors`), which has only its own weights. For every setting the same N
images are drawn (image k from the noise of index k and `--seed`, labels class-major with K per
class: see `pixelrepa.evaluation.generate`), so settings differ only in the setting. Images are made
and turned into Inception features batch by batch; only features stay in memory. The backbone and
the feature network are built once, and each EMA's weights are loaded once for all its settings.

DIR gets sweep.csv, sweep.md (one row per setting), sweep.json (settings, results, the best
setting: lowest FID, else lowest KID, else highest IS; and which weights produced each metric) and
sweep.png (FID, KID and IS, those computed, against the CFG scale, one line per EMA and step count).
They are rewritten after every setting, so an interrupted sweep keeps what it finished.

The Inception Score (`--metrics is`, 10 splits, torch-fidelity's split shuffle seed 2020) needs
torch-fidelity's classifier weights (`--inception-weights PATH`, or its download cache: see
`pixelrepa.evaluation.inception`); the sweep refuses to start without them. The classifier runs on
the same sampled batches as the feature network, so the images are sampled once. IS needs no
reference: a sweep of IS alone may leave out --ref.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from pixelrepa.config import RunConfig, apply_overrides
from pixelrepa.evaluation import features as feature_networks
from pixelrepa.evaluation import inception
from pixelrepa.evaluation.features import check_count, features_of, is_image_npz
from pixelrepa.evaluation.generate import MODEL_FILE_NAME, class_layout, generate, resolve_model_path
from pixelrepa.evaluation.plots import Panel, line_plot
from pixelrepa.files import created, write_text_atomic
from pixelrepa.evaluation.metrics import (
    FID_EPS,
    ImageSource,
    Reference,
    extract_features,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_reference,
)

SWEEP_FORMAT = "pixelrepa-sweep/1"
SWEEP_METRICS = ("fid", "kid", "is")
COLUMNS = ("ema", "steps", "method", "cfg", "interval", "num_images", "fid", "kid_mean", "kid_std", "is_mean",
           "is_std", "seconds")
KID_SEED = 2020  # KID subset draws (torch-fidelity's default); --seed is the sampling seed here
IS_SEED = 2020  # IS split shuffle (torch-fidelity's default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only `eval sweep` uses (it shares --ref, --metrics, --batch-size, --seed, --out, --device)."""
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


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------

class GeneratedImages:
    """An image source (`batches`, as `extract_features` reads) that samples the images on the fly."""

    def __init__(self, net, config: RunConfig, num_images: int, layout, batch_size: int, device, seed: int):
        self.net, self.config, self.num_images, self.layout = net, config, num_images, layout
        self.batch_size, self.device, self.seed = batch_size, device, seed

    def __len__(self) -> int:
        return self.num_images

    def batches(self, batch_size: int):
        for _, images in generate(self.net, self.config, range(self.num_images), self.layout, self.batch_size,
                                  self.device, self.seed):
            yield images.permute(0, 2, 3, 1).numpy()


def run(args: argparse.Namespace, device: torch.device) -> int:
    """`pixelrepa eval sweep MODEL`: checks everything it can before any network is built."""
    from pixelrepa.models.jit import JiT
    from pixelrepa.models.layers import set_attention_impl
    from pixelrepa.weights import load_model_file

    if len(args.paths) != 1:
        raise ValueError("usage: pixelrepa eval sweep MODEL --ref REF.npz --cfg ... --num-images N --out DIR")
    model = Path(args.paths[0])
    if not model.exists():
        raise FileNotFoundError(f"no model file or training run at {model}")
    metrics = list(dict.fromkeys(args.metrics))
    unsupported = [m for m in metrics if m not in SWEEP_METRICS]
    if unsupported:
        raise ValueError(f"a sweep computes {', '.join(SWEEP_METRICS)}, not {', '.join(unsupported)}; "
                         "evaluate a sample folder with `pixelrepa eval` for that")
    needs_reference = bool({"fid", "kid"} & set(metrics))
    if args.ref is None and needs_reference:
        raise ValueError("--ref REF.npz is required: reference statistics (from `pixelrepa eval ref-stats`)")
    if getattr(args, "features", "inception") != "inception":
        raise ValueError(f"a sweep uses the Inception features, not --features {args.features}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a sweep runs in one process: start it without torchrun")
    if args.out is None:
        raise ValueError("--out DIR is required: the folder for sweep.csv, sweep.md, sweep.json and sweep.png")
    if args.num_images is None or args.num_images < 2:
        raise ValueError(f"--num-images N >= 2 is required (the covariance needs 2 images), got {args.num_images}")
    is_splits = getattr(args, "is_splits", 10)
    if "is" in metrics and (is_splits < 1 or args.num_images < is_splits):
        raise ValueError(f"the Inception Score in --is-splits {is_splits} needs splits >= 1 and --num-images of at "
                         f"least {max(is_splits, 1)}, got {args.num_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    emas = list(dict.fromkeys(args.ema or [1]))
    if any(e < 1 for e in emas):
        raise ValueError(f"EMA indices start at 1, got {emas}")
    is_model_file = not model.is_dir() or (model / MODEL_FILE_NAME).is_file()
    if is_model_file and emas != [1]:
        raise ValueError(f"{model} is a model file with one set of weights: --ema {' '.join(map(str, emas))} "
                         "picks EMAs of a training run folder; pass the run folder, or leave --ema out")
    steps_list = list(dict.fromkeys(args.steps)) if args.steps else None
    if steps_list and any(s < 1 for s in steps_list):
        raise ValueError(f"steps must be >= 1, got {steps_list}")

    found = feature_networks.resolve_classifier(metrics, getattr(args, "inception_weights", None))
    if "is" in metrics and found is None:
        raise ValueError(f"the Inception Score is {inception.classifier_missing_reason()}")
    reference, ref_info = None, None
    if args.ref is not None and needs_reference:
        reference, ref_info = _reference(args.ref, "kid" in metrics, args.batch_size, device)
        if reference.features is not None and "kid" in metrics and len(reference.features) < 2:
            raise ValueError(f"{args.ref} holds {len(reference.features)} feature row(s); KID needs at least 2")

    paths = {e: resolve_model_path(model, e) for e in emas} if not is_model_file else \
        {None: resolve_model_path(model, 1)}
    extractor, network = inception.load_extractor(device), inception.describe()
    classifier = None
    if found is not None:  # one pass per batch through both networks: the images are sampled once
        classifier_net, classifier = feature_networks.build_classifier(found, device)
        extractor = feature_networks.WithClassifier(feature_networks.InceptionFeatures(extractor), classifier_net)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": SWEEP_FORMAT, "model": str(model.resolve()),
              "model_files": {("model" if e is None else str(e)): str(p.resolve()) for e, p in paths.items()},
              "reference": ref_info, "feature_network": network, "classifier": classifier,
              "weights": feature_networks.weights_by_metric(metrics, {"id": "inception", **network}, classifier),
              "settings": None, "results": [], "best": None, "warnings": [], "created": created()}
    if classifier is not None and not classifier["matches_published"]:
        record["warnings"].append(f"the Inception Score weights {classifier['weights']} are not torch-fidelity's "
                                  f"published file (SHA-256 {classifier['sha256'][:8]}..., not "
                                  f"{inception.PUBLISHED_SHA256_PREFIX}...): the scores are not comparable with "
                                  "published ones")
        print(f"warning: {record['warnings'][-1]}", file=sys.stderr)
    net = base = None
    for ema, path in paths.items():
        config, groups, _ = load_model_file(path)
        if "net" not in groups:
            raise ValueError(f"{path} holds no backbone ('net' group), only: {', '.join(groups)}")
        if net is None or config.model != base.model:
            net = JiT(config.model).to(device).eval()
            set_attention_impl(net, config.kernels.attention)
        net.load_state_dict(groups["net"])
        del groups
        base = config
        if record["settings"] is None:
            layout = class_layout(config.model.num_classes, None,
                                  args.per_class or max(1, math.ceil(args.num_images / config.model.num_classes)))
            record["settings"] = {
                "emas": list(paths), "steps": steps_list or [config.sampler.steps],
                "cfg": list(dict.fromkeys(args.cfg or [config.sampler.cfg_scale])),
                "method": args.method or config.sampler.method,
                "interval": list(args.interval) if args.interval else [config.sampler.interval_min,
                                                                       config.sampler.interval_max],
                "num_images": args.num_images, "per_class": layout.per_class, "seed": args.seed,
                "metrics": metrics, "batch_size": args.batch_size, "device": str(device), "fid_eps": FID_EPS,
                "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size, "kid_seed": KID_SEED,
                "is_splits": is_splits, "is_seed": IS_SEED,
                "inception_weights": getattr(args, "inception_weights", None)}
        s = record["settings"]
        for steps in s["steps"]:
            for cfg in s["cfg"]:
                setting = apply_overrides(config, {"sampler.steps": steps, "sampler.cfg_scale": cfg,
                                                   "sampler.method": s["method"],
                                                   "sampler.interval_min": s["interval"][0],
                                                   "sampler.interval_max": s["interval"][1]})
                row = evaluate_setting(net, setting, layout, args, reference, extractor, device, metrics, record)
                row["ema"] = ema
                record["results"].append({k: row[k] for k in COLUMNS} | {"kid": row.get("kid"), "is": row.get("is")})
                record["best"] = best_setting(record["results"])
                write_outputs(out, record, write_text_atomic)
    best = record["best"]
    print(format_markdown(record["results"]))
    print(f"best: {describe_row(best)} ({best_criterion(record['results'])})")
    print(f"wrote {out / 'sweep.csv'}, sweep.md, sweep.json, sweep.png")
    return 0


def evaluate_setting(net, config: RunConfig, layout, args, reference: Reference | None, extractor, device,
                     metrics: list[str], record: dict) -> dict:
    """Sample the images of one setting, their features (and classifier logits, when `extractor` is a
    `WithClassifier`) batch by batch, and the metrics."""
    s = config.sampler
    start = time.perf_counter()
    source = GeneratedImages(net, config, args.num_images, layout, args.batch_size, device, args.seed)
    label = f"{s.method} {s.steps} steps, CFG {s.cfg_scale:g}"
    with tqdm(total=args.num_images, desc=label, unit="img", dynamic_ncols=True, disable=None) as bar:
        features = extract_features(source, extractor, args.batch_size, device, bar.update)
    logits = None
    if isinstance(extractor, feature_networks.WithClassifier):
        features, logits = extractor.split(features)
    row = {"steps": s.steps, "method": s.method, "cfg": s.cfg_scale,
           "interval": f"{s.interval_min:g}-{s.interval_max:g}", "num_images": len(features),
           "fid": None, "kid_mean": None, "kid_std": None, "kid": None, "is_mean": None, "is_std": None, "is": None}
    if "fid" in metrics:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mu, sigma = feature_statistics(features)
        for w in caught:
            if str(w.message) not in record["warnings"]:
                record["warnings"].append(str(w.message))
                print(f"warning: {w.message}", file=sys.stderr)
        row["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if "kid" in metrics:
        kid = kernel_inception_distance(features, reference.features, args.kid_subsets, args.kid_subset_size,
                                        KID_SEED)
        row.update(kid=kid, kid_mean=float(kid["mean"]), kid_std=float(kid["std"]))
    if "is" in metrics:
        score = inception_score(logits, getattr(args, "is_splits", 10), IS_SEED)
        row.update({"is": score, "is_mean": float(score["value"]), "is_std": float(score["std"])})
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _reference(path: Path, needs_features: bool, batch_size: int, device) -> tuple[Reference, dict]:
    """Reference statistics from a stats .npz (checked for features when KID needs them) or an image source."""
    if path.is_file() and path.suffix == ".npz" and not is_image_npz(path):
        reference = load_reference(path, inception.FEATURE_DIM)
        made_with = ((reference.meta or {}).get("feature_network") or {}).get("id")
        if made_with not in (None, "inception"):
            raise ValueError(f"{path} holds statistics of the {made_with} features; a sweep needs Inception ones")
        if needs_features and reference.features is None:
            raise ValueError(f"{path} holds only mu and sigma; KID needs reference features: make it with "
                             "`pixelrepa eval ref-stats SRC OUT.npz --keep-features`, or pass the reference images")
        return reference, {"path": str(path.resolve()), "kind": "statistics",
                           "count": None if reference.features is None else len(reference.features),
                           "made_by": reference.meta}
    source = ImageSource(path)
    check_count(len(source), "REF")
    features, _ = features_of(source, inception.load_extractor(device), batch_size, device, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu, sigma = feature_statistics(features)
    return Reference(mu, sigma, features), source.describe()


# ---------------------------------------------------------------------------
# Results: best setting, tables, plot
# ---------------------------------------------------------------------------

def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


RANKING = (("fid", min, "FID lowest"), ("kid_mean", min, "KID lowest"), ("is_mean", max, "IS highest"))


def _ranking(rows: list[dict]) -> tuple[str, object, str]:
    """The first of FID, KID, IS that some row has: (key, min or max, its description)."""
    return next((entry for entry in RANKING if any(_finite(r.get(entry[0])) for r in rows)), RANKING[0])


def best_criterion(rows: list[dict]) -> str:
    return _ranking(rows)[2]


def best_setting(rows: list[dict]) -> dict | None:
    """The row with the lowest FID, else the lowest KID mean, else the highest Inception Score."""
    key, pick, _ = _ranking(rows)
    candidates = [r for r in rows if _finite(r.get(key))]
    return pick(candidates, key=lambda r: r[key]) if candidates else None


def describe_row(row: dict | None) -> str:
    if row is None:
        return "none"
    ema = "model" if row["ema"] is None else f"EMA {row['ema']}"
    values = [f"FID {row['fid']:.4g}" if row["fid"] is not None else "",
              f"KID {row['kid_mean']:.4g}" if row["kid_mean"] is not None else "",
              f"IS {row['is_mean']:.4g}" if row.get("is_mean") is not None else ""]
    return f"{ema}, {row['method']} {row['steps']} steps, CFG {row['cfg']:g}: " + ", ".join(v for v in values if v)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in COLUMNS])
    return buffer.getvalue()


def format_markdown(rows: list[dict], best: dict | None = None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row[c]) or "-" for c in COLUMNS]
        if best is not None and row is best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, record: dict, write_text) -> None:
    rows, best = record["results"], record["best"]
    write_text(out / "sweep.csv", format_csv(rows))
    write_text(out / "sweep.md", "# Sampler sweep\n\n" + format_markdown(rows, best)
               + f"\nBest: {describe_row(best)}\n")
    write_text(out / "sweep.json", json.dumps(record, indent=2) + "\n")
    plot(rows, out / "sweep.png")


def _series(rows: list[dict], key: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """One (label, sorted (cfg, value) points) per (ema, steps) with values of `key`."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if _finite(r.get(key)):
            groups.setdefault((r["ema"], r["steps"]), []).append((float(r["cfg"]), float(r[key])))
    return [(("model" if ema is None else f"EMA {ema}") + f", {steps} steps", sorted(points))
            for (ema, steps), points in groups.items()]


def plot(rows: list[dict], path: Path) -> None:
    """FID, KID and IS (those computed) against the CFG scale, one line per EMA and step count."""
    line_plot([Panel(f"{title} against CFG scale", "CFG scale", title, _series(rows, key))
               for key, title in (("fid", "FID"), ("kid_mean", "KID"), ("is_mean", "IS"))], path)
