"""Evaluate samples against a reference: FID, KID, precision / recall with the offline FID Inception-v3,
and the Inception Score where torch-fidelity's classifier weights are present.

  pixelrepa eval SAMPLES [SAMPLES ...] --ref REF [--metrics fid kid pr is] [--inception-weights PATH] [--out result.json]
  pixelrepa eval ref-stats SRC OUT.npz [--keep-features]
  pixelrepa eval sweep MODEL --ref REF.npz --cfg 1.0 1.5 2.0 [--ema 1 2] [--steps 50 ...] [--seeds 0 1 2]
                 [--method heun dpm2m] [--schedule uniform edm] [--guide-model none WEAKER] --num-images N --out DIR

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
`sweep` samples N images per (EMA, steps, method, schedule, guide, CFG) setting in memory and writes
FID / KID tables and a plot to DIR, with the network evaluations per image each setting ran, counted,
as the plot's x-axis (see `pixelrepa.evaluation.sweep`); `--seeds 0 1 2` (instead of `--seed`) samples
each setting once per seed and reports each metric as mean and std over the seeds.
(A sample folder literally named `ref-stats` or `sweep` is given as ./ref-stats or ./sweep.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

import torch

from pixelrepa.config import SamplerMethod, SamplerSchedule
from pixelrepa.device import pick_device
from pixelrepa.distributed import World, in_process_group
from pixelrepa.evaluation import inception, pipeline, sweep
from pixelrepa.evaluation.metrics import DEFAULTS, METRICS, ScoreSettings
from pixelrepa.files import write_text_atomic


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
    parser.add_argument("--kid-subsets", type=int, default=DEFAULTS.kid_subsets,
                        help=f"KID subsets (default {DEFAULTS.kid_subsets})")
    parser.add_argument("--kid-subset-size", type=int, default=DEFAULTS.kid_subset_size,
                        help=f"KID subset size, capped at the smaller set (default {DEFAULTS.kid_subset_size})")
    parser.add_argument("--seed", type=int, help=f"KID subset draws and IS split shuffle (default {DEFAULTS.kid_seed}, "
                        "as torch-fidelity); sweep: the sampling seed (default 0)")
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
    parser.add_argument("--is-splits", type=int, default=DEFAULTS.is_splits,
                        help=f"Inception Score splits (default {DEFAULTS.is_splits})")
    group = parser.add_argument_group("sweep", "options of `pixelrepa eval sweep MODEL`")
    group.add_argument("--cfg", type=float, nargs="+", help="sweep: CFG scales (default: the model's)")
    group.add_argument("--ema", type=int, nargs="+", help="sweep: EMAs of a training run (default 1)")
    group.add_argument("--steps", type=int, nargs="+", help="sweep: sampler step counts (default: the model's)")
    group.add_argument("--method", nargs="+", choices=typing.get_args(SamplerMethod),
                       help="sweep: solvers (default: the model's)")
    group.add_argument("--schedule", nargs="+", choices=typing.get_args(SamplerSchedule),
                       help="sweep: time grids (default: the model's; shifted and edm take the model's shift / rho)")
    group.add_argument("--guide-model", nargs="+", metavar="WEAKER",
                       help="sweep: guidance, each of `none` (classifier-free) or a weaker model of the same data "
                            "(autoguidance; --cfg is then its weight) (default: none)")
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
        settings = ref_stats_settings(args)
        done = in_process_group(lambda world: pipeline.reference_stats(settings, device_in(world, args, device), world))
        if done is not None:  # rank 0
            (n, dim), seconds = done
            print(f"wrote {settings.out}: {n} images, {dim}-d statistics"
                  f"{' and features' if settings.keep_features else ''} ({seconds / n:.3f} s/image)")
        return 0
    if args.samples == "sweep":
        return run_sweep(sweep_settings(args), device)
    settings = eval_settings(args)
    record = in_process_group(lambda world: pipeline.evaluate(settings, device_in(world, args, device), world))
    if record is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    text = json.dumps(record, indent=2)
    print(text)
    if "bands" in record:
        print(pipeline.format_bands(record["bands"]), file=sys.stderr)
    if args.out is not None:
        write_text_atomic(args.out, text + "\n")
    return 0


def device_in(world: World, args: argparse.Namespace, device: torch.device) -> torch.device:
    """Under torchrun each rank works on its own device unless --device names one."""
    return world.device if world.world_size > 1 and not args.device else device


def ref_stats_settings(args: argparse.Namespace) -> pipeline.RefStatsSettings:
    """`eval ref-stats SRC OUT.npz`'s arguments as the library's settings."""
    if len(args.paths) != 2:
        raise ValueError("usage: pixelrepa eval ref-stats SRC OUT.npz")
    if args.inception_weights is not None:
        raise ValueError("--inception-weights is for the Inception Score of an evaluation, not for ref-stats")
    return pipeline.RefStatsSettings(Path(args.paths[0]), Path(args.paths[1]), args.keep_features, args.batch_size,
                                     args.max_images, args.features, args.encoder_weights)


def eval_settings(args: argparse.Namespace) -> pipeline.EvalSettings:
    """`eval SAMPLES ... --ref REF`'s arguments, checked, as the library's settings."""
    if args.seeds is not None:
        raise ValueError("--seeds is for `pixelrepa eval sweep`; for bands over sample folders pass one folder per "
                         "sampling seed: pixelrepa eval S0 S1 S2 --ref REF")
    if args.ref is None:
        raise ValueError("--ref REF is required: a reference statistics .npz or an image source")
    seed = DEFAULTS.kid_seed if args.seed is None else args.seed
    scores = ScoreSettings(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, kid_seed=seed,
                           is_splits=args.is_splits, is_seed=seed)
    return pipeline.EvalSettings(
        samples=(Path(args.samples), *map(Path, args.paths)), ref=args.ref, metrics=tuple(args.metrics),
        batch_size=args.batch_size, max_images=args.max_images, scores=scores, features=args.features,
        encoder_weights=args.encoder_weights, inception_weights=args.inception_weights)


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
        emas=emas, steps=steps, cfg=tuple(dict.fromkeys(args.cfg)) if args.cfg else None,
        methods=tuple(dict.fromkeys(args.method)) if args.method else None,
        schedules=tuple(dict.fromkeys(args.schedule)) if args.schedule else None,
        guides=tuple(dict.fromkeys(None if g == "none" else Path(g) for g in args.guide_model or ["none"])),
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
