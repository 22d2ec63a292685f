"""Convert a released PixelREPA or JiT checkpoint-last.pth into a pixelrepa model file.

Loads with weights-only unpickling (argparse.Namespace is the one allowed class), keeps
the chosen backbone weights (raw, EMA 1 or EMA 2) and the adapter, and drops the
optimiser. Without --preset/--config the configuration is recovered from the
checkpoint's saved args; a configuration that does not fit is refused. The sampler
settings come from the saved args (SPEC 8) unless --set sampler.* or the sampler flags
say otherwise. A JiT checkpoint from the JiT authors' code gets the mask token it lacks
(SPEC 3). --encoder-out also writes the frozen encoder a PixelREPA checkpoint was trained
against, for `--encoder-weights` / align.encoder.weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelrepa.cli.common import (
    add_config_arguments,
    add_sampler_arguments,
    base_config,
    describe_sampler,
    sampler_overrides,
    set_overrides,
)
from pixelrepa.config import apply_overrides
from pixelrepa.interop.released import (
    config_from_args,
    export_encoder,
    import_released,
    read_released_checkpoint,
    sampler_settings,
)
from pixelrepa.weights import save_model_file

EMA_CHOICES = {"raw": "raw", "0": "raw", "1": "ema1", "2": "ema2", "ema1": "ema1", "ema2": "ema2"}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="released checkpoint-last.pth")
    parser.add_argument("output", type=Path, help="pixelrepa model file to write (.safetensors)")
    parser.add_argument("--ema", default="1", choices=sorted(EMA_CHOICES),
                        help="backbone weights: raw, 1 (EMA 0.9999, default) or 2 (EMA 0.9996)")
    parser.add_argument("--encoder-out", type=Path, metavar="FILE",
                        help="also write the checkpoint's frozen encoder (repa_model.) as safetensors, "
                             "for --encoder-weights / align.encoder.weights")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_config_arguments(parser)
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> int:
    for path in (args.output, args.encoder_out):
        if path is not None and path.exists() and not args.force:
            raise ValueError(f"{path} exists; pass --force to overwrite it")
    weights = EMA_CHOICES[args.ema]
    ckpt = read_released_checkpoint(args.source)
    if args.encoder_out is not None and ckpt.encoder is None:
        raise ValueError(f"{args.source} holds no encoder ('repa_model.' keys), so --encoder-out has nothing to "
                         "write: only PixelREPA checkpoints carry one")
    config = base_config(args)
    if config is None:
        if ckpt.args is None:
            raise ValueError(f"{args.source} stores no 'args'; pass the configuration (--preset and/or --config)")
        config = config_from_args(ckpt.args)
    taken = sampler_settings(ckpt.args)
    given = set_overrides(args) | sampler_overrides(args)
    try:
        config = apply_overrides(config, taken | given)
    except ValueError as err:
        raise ValueError(f"{err} (the checkpoint's args give the sampler settings {taken}; the sampler flags "
                         "--steps/--method/--cfg/--interval or --set override them)") from None
    config, net, adapter = import_released(ckpt, config, weights)

    for note in ckpt.notes:
        print(f"note: {note}")
    if taken:
        overridden = sorted(k for k in taken if k in given)
        print("sampler settings from the checkpoint's args: "
              + ", ".join(f"{k.removeprefix('sampler.')}={v}" for k, v in taken.items())
              + (f" (overridden: {', '.join(k.removeprefix('sampler.') for k in overridden)})" if overridden else ""))
    if args.encoder_out is not None:
        export_encoder(ckpt, args.encoder_out)
        a = ckpt.args
        print(f"wrote {args.encoder_out}: the frozen encoder {a.repa_model} at {a.repa_image_size} px, patch "
              f"{a.repa_patch_size} ({len(ckpt.encoder)} tensors); use it with --encoder-weights {args.encoder_out}")
    groups = {"net": net.state_dict()}
    if adapter is not None:
        groups["adapter"] = adapter.state_dict()
    save_model_file(args.output, config, groups,
                    provenance={"source": str(args.source), "weights": weights, "epoch": str(ckpt.epoch)})
    print(f"wrote {args.output}: backbone ({weights}){' + adapter' if adapter is not None else ''}, "
          f"epoch {ckpt.epoch}, alignment {config.align.mode}, sampler {describe_sampler(config)}")
    return 0
