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
from pathlib import Path

import torch

from pixelrepa.cli.common import add_sampler_arguments, sampler_changes
from pixelrepa.config import ENCODER_PRESETS
from pixelrepa.device import pick_device
from pixelrepa.distributed import in_process_group
from pixelrepa.evaluation import diversity, probe


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    probes = parser.add_subparsers(dest="probe", required=True, metavar="PROBE")
    align = probes.add_parser("align", help="CKNNA / CKA / mutual kNN of block tokens against an encoder, "
                              "per block and t", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    align.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                       help="a training run or checkpoint folder, or a model file (or a Hub id ORG/NAME)")
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
    """`probe align`: under torchrun each rank reads its slice of the images, rank 0 writes and prints."""
    settings = probe.ProbeAlignSettings(
        checkpoint=args.checkpoint, data=args.data, out=args.out, ema=args.ema,
        blocks=None if args.blocks is None else tuple(args.blocks), t=tuple(args.t), images=args.images, k=args.k,
        encoder=args.encoder, encoder_weights=args.encoder_weights, labels=args.labels, batch_size=args.batch_size,
        seed=args.seed)
    device = torch.device(args.device) if args.device else None
    result = in_process_group(lambda world: probe.run_align(settings, world, device))
    if result is not None:
        print(probe.format_grids(result.table))
        print(probe.format_head(result.record["head"]))
        print(f"wrote {settings.out / 'alignment.csv'}, alignment.json, alignment.png")
    return 0


def run_diversity(args: argparse.Namespace) -> int:
    """`probe diversity`."""
    settings = diversity.DiversitySettings(
        samples=args.samples, data=args.data, out=args.out, per_class=args.per_class,
        real_per_class=args.real_per_class, classes=None if args.classes is None else tuple(args.classes),
        spaces=tuple(args.spaces), encoder=args.encoder, encoder_weights=args.encoder_weights, ema=args.ema,
        sampler=sampler_changes(args), top=args.top, batch_size=args.batch_size, seed=args.seed)
    result = diversity.run_diversity(settings, torch.device(args.device) if args.device else pick_device())
    print(diversity.format_table(result.rows, result.summary, result.spaces))
    print(f"wrote {settings.out / 'diversity.csv'}, diversity.json, diversity.png, collapsed.png")
    return 0
