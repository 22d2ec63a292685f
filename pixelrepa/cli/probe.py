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
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pixelrepa.config import ENCODER_PRESETS, get_encoder_preset
from pixelrepa.evaluation import probe
from pixelrepa.files import created
from pixelrepa.training.device import pick_device


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
    """`probe align` (the only probe so far)."""
    from pixelrepa.align.encoders import build_encoder
    from pixelrepa.data.packed import PackedDataset
    from pixelrepa.models.jit import JiT
    from pixelrepa.models.layers import set_attention_impl

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    device = torch.device(args.device) if args.device else pick_device()
    config, state, source = probe.load_backbone(args.checkpoint, args.ema)
    blocks, ts = probe.check_blocks(args.blocks, config.model.depth), probe.check_ts(args.t)

    encoder_cfg = config.align.encoder if args.encoder is None else get_encoder_preset(args.encoder)
    if args.encoder_weights is not None:
        if not args.encoder_weights.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {args.encoder_weights}")
        encoder_cfg = dataclasses.replace(encoder_cfg, weights=str(args.encoder_weights.resolve()))
    if config.align.mode == "none" and args.encoder is None:
        print(f"note: this run trained without alignment (align.mode none); probing against its config's "
              f"align.encoder '{encoder_cfg.name}': --encoder PRESET picks another", file=sys.stderr)

    pack = PackedDataset(args.data, expected_size=config.model.input_size,
                         num_classes=config.model.num_classes if args.labels == "data" else None)
    indices = probe.probe_indices(len(pack), args.images, args.seed)
    if len(indices) <= args.k:
        raise ValueError(f"{len(indices)} image(s) for k = {args.k} nearest neighbours: more than {args.k} are needed")

    net = JiT(config.model)
    net.load_state_dict(state)
    net = net.to(device).eval()
    set_attention_impl(net, config.kernels.attention)
    try:
        encoder = build_encoder(encoder_cfg).to(device)
    except RuntimeError as err:  # weights not reachable (offline): a usage error, reported as such
        raise ValueError(f"encoder '{encoder_cfg.name}': {err}") from err

    with tqdm(total=len(indices), desc="probe", unit="img", dynamic_ncols=True, disable=None) as bar:
        table = probe.align_probe(net, encoder, probe.pack_batches(pack, indices, args.batch_size, args.labels == "data"),
                                  blocks, ts, args.k, args.seed, config.objective.noise_scale, bar.update)
    record = {
        "format": probe.PROBE_FORMAT,
        "model": source,
        "align_mode": config.align.mode,
        "tap_block": config.tap_block,
        "encoder": dataclasses.asdict(encoder_cfg) | {"from": "run config" if args.encoder is None else "--encoder"},
        "data": {"path": str(args.data.resolve()), "available": len(pack), "used": len(indices)},
        "settings": {"blocks": blocks, "t": ts, "k": args.k, "seed": args.seed, "labels": args.labels,
                     "noise_scale": config.objective.noise_scale, "pooling": probe.POOLING,
                     "metrics": list(probe.METRICS), "batch_size": args.batch_size, "device": str(device)},
        "created": created(),
    }
    probe.write_outputs(args.out, record, table)
    print(probe.format_grids(table))
    print(f"wrote {args.out / 'alignment.csv'}, alignment.json, alignment.png")
    return 0
