"""Convert a released PixelREPA or JiT checkpoint-last.pth into a pixelrepa model file.

Loads with weights-only unpickling (argparse.Namespace is the one allowed class), keeps
the chosen backbone weights (raw, EMA 1 or EMA 2) and the adapter, and drops the
encoder and the optimiser. Without --preset/--config the configuration is recovered
from the checkpoint's saved args; a configuration that does not fit is refused."""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelrepa.cli.common import add_config_arguments, resolve_config
from pixelrepa.interop.released import import_released, read_released_checkpoint
from pixelrepa.weights import save_model_file

EMA_CHOICES = {"raw": "raw", "0": "raw", "1": "ema1", "2": "ema2", "ema1": "ema1", "ema2": "ema2"}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="released checkpoint-last.pth")
    parser.add_argument("output", type=Path, help="pixelrepa model file to write (.safetensors)")
    parser.add_argument("--ema", default="1", choices=sorted(EMA_CHOICES),
                        help="backbone weights: raw, 1 (EMA 0.9999, default) or 2 (EMA 0.9996)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.force:
        raise ValueError(f"{args.output} exists; pass --force to overwrite it")
    weights = EMA_CHOICES[args.ema]
    config, net, adapter = import_released(args.source, resolve_config(args, required=False), weights)
    groups = {"net": net.state_dict()}
    if adapter is not None:
        groups["adapter"] = adapter.state_dict()
    epoch = read_released_checkpoint(args.source).epoch
    save_model_file(args.output, config, groups,
                    provenance={"source": str(args.source), "weights": weights, "epoch": str(epoch)})
    print(f"wrote {args.output}: backbone ({weights}){' + adapter' if adapter is not None else ''}, "
          f"epoch {epoch}, alignment {config.align.mode}")
    return 0
