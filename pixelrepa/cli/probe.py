"""Probe a trained backbone's representations.

  pixelrepa probe align CHECKPOINT --data PACK [--ema 1|2|raw] [--blocks 0 3 5] [--t 0.25 0.5 0.75 1.0]
                        [--images 1000] [--k 10] [--encoder PRESET] [--encoder-weights FILE] [--out DIR]

`align`: how closely each block's tokens match a frozen encoder's features, at each signal level t
(1 = clean, 0 = pure noise): CKNNA (Huh et al. 2024, as REPA reports it), linear CKA and mutual kNN
between the mean-pooled image tokens after each block and the encoder's mean-pooled features of the
clean images, on a seeded random subset of the pack (see `pixelrepa.evaluation.probe`). Block b is
the tokens after b blocks, as `align.tap_block` counts (0: the patch embedding); default every block.
CHECKPOINT is a training run or checkpoint folder (EMA 1 by default; `--ema raw`: the trained weights)
or a model file. The encoder is the run's `align.encoder`; `--encoder PRESET` picks a registered one
(as registered: dinov2-b, efficientnet-lite0, ...), which a run trained with align.mode none may need,
and `--encoder-weights FILE` a local weights file for it (needed offline for DINOv2). DIR gets
alignment.csv, alignment.json (every setting and the source of each input) and alignment.png (blocks
x t heatmaps); the tables are printed.

  pixelrepa probe diversity SAMPLES --data PACK [--per-class N] [--real-per-class M] [--classes C ...]
                            [--spaces encoder inception] [--encoder PRESET] [--encoder-weights FILE]
                            [--ema 1|2|raw] [--steps S --cfg W ...] [--seed S] [--top 5] [--out DIR]

`diversity`: within-class collapse. SAMPLES is a `pixelrepa sample` output folder (labels from its
manifest's class layout, or its samples.npz), an .npz with `arr_0` and `labels`, or a training run /
checkpoint folder / model file, from which `--per-class N` images of each class are drawn on the fly
(seed `--seed`, images 0.. of a `pixelrepa sample` run with the same classes, count and seed; sampler
flags as for `sample`). The real images are up to `--real-per-class` (default 50, a seeded draw) of
each class of the pack. For each class in both (or `--classes`), in the encoder's space (`--encoder`,
default the run's align.encoder) and / or the FID Inception's (`--spaces`): the mean pairwise L2
distance of the generated and of the real features (rows L2-normalised), their ratio gen / real
(< 1: collapse), precision / recall (k = 3), and the real class's tightness (mean distance to its
centroid); across classes, the Pearson and Spearman correlation of tightness with the ratio, and the
`--top` most-collapsed classes (see `pixelrepa.evaluation.diversity`). DIR gets diversity.csv,
diversity.json, diversity.png (tightness vs ratio) and collapsed.png (generated rows above real rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixelrepa.cli.common import add_sampler_arguments, sampler_overrides
from pixelrepa.config import ENCODER_PRESETS, get_encoder_preset
from pixelrepa.evaluation import diversity, probe
from pixelrepa.device import pick_device
from pixelrepa.files import created
from pixelrepa.loading import load_head, load_model


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    probes = parser.add_subparsers(dest="probe", required=True, metavar="PROBE")
    align = probes.add_parser("align", help="CKNNA / CKA / mutual kNN of block tokens against an encoder, "
                              "per block and t", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    align.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                       help="a training run or checkpoint folder, or a model file")
    align.add_argument("--data", type=Path, required=True, metavar="PACK", help="a pack folder (pixelrepa data ...)")
    align.add_argument("--ema", type=ema_choice, metavar="1|2|raw",
                       help="a training run's weights: EMA 1 (default), 2, or raw (the trained parameters)")
    align.add_argument("--blocks", type=int, nargs="+", metavar="B",
                       help="tokens after B blocks, 0 .. depth (default: every block, 1 .. depth)")
    align.add_argument("--t", type=float, nargs="+", default=list(probe.DEFAULT_T), metavar="T",
                       help="signal levels, 1 = clean (default: 0.25 0.5 0.75 1.0)")
    align.add_argument("--images", type=int, default=1000, help="images drawn from the pack (default 1000)")
    align.add_argument("--k", type=int, default=probe.DEFAULT_K, help="nearest neighbours (default 10)")
    align.add_argument("--encoder", choices=sorted(ENCODER_PRESETS), metavar="PRESET",
                       help=f"a registered encoder instead of the run's align.encoder: {', '.join(sorted(ENCODER_PRESETS))}")
    align.add_argument("--encoder-weights", type=Path, metavar="FILE", help="a local weights file for the encoder")
    align.add_argument("--labels", choices=["data", "null"], default="data",
                       help="class labels given to the backbone: the pack's (default) or the null class")
    align.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    align.add_argument("--seed", type=int, default=0, help="image subset and noise (default 0)")
    align.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    align.add_argument("--out", type=Path, default=Path("probe-align"), metavar="DIR",
                       help="output folder (default ./probe-align)")

    div = probes.add_parser("diversity", help="per-class diversity of samples against real images, and its "
                            "correlation with class tightness", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    div.add_argument("samples", type=Path, metavar="SAMPLES",
                     help="a pixelrepa sample folder or .npz (with labels), or a run / checkpoint folder / model "
                          "file to sample from")
    div.add_argument("--data", type=Path, required=True, metavar="PACK", help="the real images: a pack folder")
    div.add_argument("--per-class", type=int, metavar="N",
                     help="generated images per class (default: all of a folder's; 16 drawn from a model)")
    div.add_argument("--real-per-class", type=int, default=50, metavar="M",
                     help="real images per class, a seeded draw (default 50)")
    div.add_argument("--classes", type=int, nargs="+", metavar="C",
                     help="class indices (default: every class in both sets; from a model: the pack's)")
    div.add_argument("--spaces", nargs="+", choices=list(diversity.SPACES), default=list(diversity.SPACES),
                     help="feature spaces (default: encoder inception); the first ranks the collapse")
    div.add_argument("--encoder", choices=sorted(ENCODER_PRESETS), metavar="PRESET",
                     help="a registered encoder (default: the run's align.encoder): "
                          f"{', '.join(sorted(ENCODER_PRESETS))}")
    div.add_argument("--encoder-weights", type=Path, metavar="FILE", help="a local weights file for the encoder")
    div.add_argument("--ema", type=ema_choice, metavar="1|2|raw", help="sampling from a training run: its weights")
    add_sampler_arguments(div)
    div.add_argument("--top", type=int, default=diversity.DEFAULT_TOP,
                     help=f"most-collapsed classes listed and shown (default {diversity.DEFAULT_TOP})")
    div.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    div.add_argument("--seed", type=int, default=0, help="sampling noise and the real subset (default 0)")
    div.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    div.add_argument("--out", type=Path, default=Path("probe-diversity"), metavar="DIR",
                     help="output folder (default ./probe-diversity)")


def ema_choice(text: str) -> int | str:
    """'raw' or an EMA index >= 1."""
    if text == "raw":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an EMA index (1, 2) or 'raw', got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"EMA indices start at 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """`probe align` or `probe diversity`."""
    return {"align": run_align, "diversity": run_diversity}[args.probe](args)


def run_align(args: argparse.Namespace) -> int:
    """`probe align`: under torchrun each rank reads its slice of the images, rank 0 writes."""
    from pixelrepa.cli.eval import in_process_group

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    device = torch.device(args.device) if args.device else pick_device()
    return in_process_group(args, device, lambda device: align_on(args, device))


def align_on(args: argparse.Namespace, device: torch.device) -> int:
    from pixelrepa.align.encoders import build_encoder
    from pixelrepa.data.packed import PackedDataset
    from pixelrepa.evaluation.features import gather_in_order, rank_slice
    from pixelrepa.models.layers import set_attention_impl

    rank, world_size = args.world.rank, args.world.world_size
    config, net, source = load_model(args.checkpoint, args.ema, device)
    blocks, ts = probe.check_blocks(args.blocks, config.model.depth), probe.check_ts(args.t)
    head, head_source = load_head(args.checkpoint, config)

    encoder_cfg = config.align.encoder if args.encoder is None else get_encoder_preset(args.encoder)
    if args.encoder_weights is not None:
        if not args.encoder_weights.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {args.encoder_weights}")
        encoder_cfg = dataclasses.replace(encoder_cfg, weights=str(args.encoder_weights.resolve()))
    if head is not None and encoder_cfg.name != config.align.encoder.name:
        head, head_source = None, (f"the head predicts the run's align.encoder '{config.align.encoder.name}', "
                                   f"not the probed '{encoder_cfg.name}'")
    if config.align.mode == "none" and args.encoder is None and rank == 0:
        print(f"note: this run trained without alignment (align.mode none); probing against its config's "
              f"align.encoder '{encoder_cfg.name}': --encoder PRESET picks another", file=sys.stderr)

    pack = PackedDataset(args.data, expected_size=config.model.input_size,
                         num_classes=config.model.num_classes if args.labels == "data" else None)
    indices = probe.probe_indices(len(pack), args.images, args.seed)
    if len(indices) <= args.k:
        raise ValueError(f"{len(indices)} image(s) for k = {args.k} nearest neighbours: more than {args.k} are needed")
    if rank == 0:
        cost = probe.probe_cost(config, encoder_cfg, blocks, ts, len(indices), head is not None)
        print(probe.format_cost(cost, encoder_cfg.name) + (f" on {world_size} processes" if world_size > 1 else ""),
              file=sys.stderr, flush=True)

    set_attention_impl(net, config.kernels.attention)
    if head is not None:
        head = head.to(device).eval()
        set_attention_impl(head, config.kernels.attention)
    try:
        encoder = build_encoder(encoder_cfg).to(device)
    except RuntimeError as err:  # weights not reachable (offline): a usage error, reported as such
        raise ValueError(f"encoder '{encoder_cfg.name}': {err}") from err

    start, stop = rank_slice(len(indices), rank, world_size)
    part, error = None, None
    try:
        with tqdm(total=stop - start, desc="probe", unit="img", dynamic_ncols=True,
                  disable=None if rank == 0 else True) as bar:
            batches = probe.pack_batches(pack, indices[start:stop], args.batch_size, args.labels == "data")
            part = probe.probe_features(net, encoder, batches, blocks, ts, args.seed, config.objective.noise_scale,
                                        start, head, config.tap_block, config.align.mask_ratio, bar.update)
    except Exception as err:
        if world_size == 1:
            raise
        error = f"rank {rank}: {err}"  # raised on every rank by the gather, so no rank waits forever
    parts = gather_in_order(part, start, error, world_size, rank, RuntimeError)
    if parts is None:
        return 0
    features = probe.join(parts)
    table = probe.alignment_table(features, args.k)
    if head is None:
        head_record = {"why_not": head_source}
    else:
        head_record = {"source": head_source, "kind": config.align.mode, "tap_block": config.tap_block,
                       "mask_ratio": config.align.mask_ratio if config.align.mode == "pixelrepa" else 0.0,
                       "mean_cosine": {f"{t:g}": v for t, v in probe.mean_head_cosine(features).items()}}
    record = {
        "format": probe.PROBE_FORMAT,
        "model": source,
        "align_mode": config.align.mode,
        "tap_block": config.tap_block,
        "encoder": dataclasses.asdict(encoder_cfg) | {"from": "run config" if args.encoder is None else "--encoder"},
        "data": {"path": str(args.data.resolve()), "available": len(pack), "used": len(indices)},
        "settings": {"blocks": blocks, "t": ts, "k": args.k, "seed": args.seed, "labels": args.labels,
                     "noise_scale": config.objective.noise_scale, "pooling": probe.POOLING,
                     "metrics": list(probe.METRICS), "batch_size": args.batch_size, "device": str(device),
                     "world_size": world_size},
        "head": head_record,
        "created": created(),
    }
    probe.write_outputs(args.out, record, table)
    print(probe.format_grids(table))
    print(probe.format_head(head_record))
    print(f"wrote {args.out / 'alignment.csv'}, alignment.json, alignment.png")
    return 0


def is_sample_source(path: Path) -> bool:
    """A `pixelrepa sample` folder or an .npz of images, rather than a model to sample from."""
    from pixelrepa.evaluation.sample_folder import IMAGES_DIR, MANIFEST_NAME, NPZ_NAME

    if path.is_file():
        return path.suffix == ".npz"
    return ((path / MANIFEST_NAME).is_file() and (path / IMAGES_DIR).is_dir()) or (path / NPZ_NAME).is_file()


def sample_folder_config(path: Path):
    """The run config of the model a sample folder's manifest names, or None when it is not readable."""
    import json

    from pixelrepa.evaluation.sample_folder import MANIFEST_NAME
    from pixelrepa.weights import load_model_file

    try:
        model = Path(json.loads((path / MANIFEST_NAME).read_text())["model"])
        return load_model_file(model)[0]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_diversity(args: argparse.Namespace) -> int:
    """`probe diversity`."""
    from pixelrepa.align.encoders import build_encoder
    from pixelrepa.config import apply_overrides
    from pixelrepa.evaluation.features import EncoderFeatures, _own_grid, build_feature_extractor
    from pixelrepa.models.layers import set_attention_impl
    from pixelrepa.sampling import sample_classes

    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--top", args.top, 1),
                               ("--real-per-class", args.real_per_class, 2), ("--per-class", args.per_class, 2)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    spaces = list(dict.fromkeys(args.spaces))
    device = torch.device(args.device) if args.device else pick_device()
    if not args.samples.exists():
        raise FileNotFoundError(f"no sample folder, .npz, model file or training run at {args.samples}")
    real = diversity.ImageSet.from_pack(args.data)
    sampler_flags = sampler_overrides(args)

    if is_sample_source(args.samples):
        if args.ema is not None or sampler_flags:
            raise ValueError(f"{args.samples} holds samples already: --ema and the sampler flags apply only when "
                             "sampling from a model or run; leave them out")
        generated = diversity.ImageSet.from_samples(args.samples)
        config = sample_folder_config(args.samples) if args.samples.is_dir() else None
        classes = diversity.common_classes(generated.labels, real.labels, args.classes)
        gen_source = generated.source
    else:
        config, net, model_source = load_model(args.samples, args.ema, device)
        config = apply_overrides(config, sampler_flags)
        in_model = np.arange(config.model.num_classes)
        classes = diversity.common_classes(in_model, real.labels, args.classes)
        per_class = 16 if args.per_class is None else args.per_class
        for c in classes:  # refuse before sampling
            diversity.check_class_counts(c, per_class, min(int((real.labels == c).sum()), args.real_per_class))
        set_attention_impl(net, config.kernels.attention)
        print(f"sampling {len(classes)} classes x {per_class} ({config.sampler.method} {config.sampler.steps} steps, "
              f"CFG {config.sampler.cfg_scale}, seed {args.seed})", file=sys.stderr)
        images = sample_classes(net, config, classes, per_class, args.seed, device, args.batch_size)
        del net
        labels = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
        gen_source = {"kind": "sampled", "model": model_source, "per_class": per_class, "seed": args.seed,
                      "sampler": dataclasses.asdict(config.sampler)}
        generated = diversity.ImageSet.from_tensor(images, labels, gen_source)

    gen_index = diversity.select_per_class(generated.labels, classes, args.per_class, args.seed)
    real_index = diversity.select_per_class(real.labels, classes, args.real_per_class, args.seed)
    for c in classes:
        diversity.check_class_counts(c, int((generated.labels[gen_index] == c).sum()),
                                     int((real.labels[real_index] == c).sum()))

    encoder_record = None
    extractors = {}
    if "encoder" in spaces:
        if args.encoder is not None:
            encoder_cfg, found = get_encoder_preset(args.encoder), "--encoder"
        elif config is not None:
            encoder_cfg, found = config.align.encoder, "run config"
        else:
            raise ValueError(f"no run config to take align.encoder from for {args.samples}: pass --encoder PRESET "
                             f"({', '.join(sorted(ENCODER_PRESETS))}), or --spaces inception")
        if args.encoder_weights is not None:
            if not args.encoder_weights.is_file():
                raise FileNotFoundError(f"encoder weights file not found: {args.encoder_weights}")
            encoder_cfg = dataclasses.replace(encoder_cfg, weights=str(args.encoder_weights.resolve()))
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
            gen_features = diversity.extract(extractors[space], generated, gen_index, args.batch_size, device,
                                             bar.update)
            real_features = diversity.extract(extractors[space], real, real_index, args.batch_size, device,
                                              bar.update)
        results[space] = diversity.class_metrics(gen_features, generated.labels[gen_index], real_features,
                                                 real.labels[real_index], classes)
    rows = diversity.table_rows(results, real.class_names)
    summary = diversity.summarise(rows, spaces, args.top)
    record = {
        "format": diversity.DIVERSITY_FORMAT,
        "generated": {**gen_source, "used": len(gen_index)},
        "real": {**real.source, "used": len(real_index), "per_class": args.real_per_class},
        "encoder": encoder_record,
        "inception": inception_record,
        "settings": {"spaces": spaces, "classes": classes, "k": diversity.PR_NEIGHBORHOOD, "top": args.top,
                     "seed": args.seed, "normalisation": diversity.NORMALISATION, "batch_size": args.batch_size,
                     "device": str(device)},
        "created": created(),
    }
    diversity.write_outputs(args.out, record, rows, summary, spaces)
    diversity.collapsed_grid(generated, gen_index, real, real_index, summary["most_collapsed"],
                             args.out / "collapsed.png")
    print(diversity.format_table(rows, summary, spaces))
    print(f"wrote {args.out / 'diversity.csv'}, diversity.json, diversity.png, collapsed.png")
    return 0
