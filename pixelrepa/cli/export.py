"""Export a trained model: a sampling model file (default), a Hugging Face Hub folder (--hub), a
diffusers pipeline folder (--diffusers) or the released checkpoint-last.pth layout (--released).

A model file keeps one EMA backbone and its config; the adapter, projector, raw weights and
optimiser state are left behind (SPEC 6). --hub and --diffusers also take a model file (or a Hub
id) as the source; --push ORG/NAME then uploads the folder (a Hugging Face token must be configured).
--released writes the raw weights, both EMAs, the adapter, the frozen encoder and the AdamW moments
of a training run under the released key names and numbering, with the released `args`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelrepa.checkpoint import export_sampling_checkpoint, find_checkpoint

EMA_CHOICES = {"raw": "raw", "1": 1, "2": 2}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder; "
                        "with --hub / --diffusers also a model file or a Hub id ORG/NAME")
    parser.add_argument("output", type=Path, help="model file to write (.safetensors); with --hub / --diffusers a "
                        "folder; with --released a .pth file")
    parser.add_argument("--ema", choices=sorted(EMA_CHOICES),
                        help="which weights of a run: 1 (EMA 0.9999, default), 2 (0.9996) or raw (--hub / --diffusers)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--hub", action="store_true", help="write a Hugging Face Hub folder: model.safetensors, "
                        "config.json and a README.md model card")
    layout.add_argument("--diffusers", action="store_true", help="write a diffusers pipeline folder "
                        "(DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True))")
    layout.add_argument("--released", action="store_true", help="write the released checkpoint-last.pth layout "
                        "(model, model_ema1, model_ema2, optimizer, epoch, args)")
    parser.add_argument("--push", metavar="ORG/NAME", help="with --hub or --diffusers: upload the folder to this "
                        "Hub repository (needs a token: `hf auth login` or HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="with --push: create the repository private")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file or folder")


def run(args: argparse.Namespace) -> int:
    if args.push is not None and not (args.hub or args.diffusers):
        raise ValueError("--push uploads a Hub or diffusers folder: add --hub or --diffusers")
    output = args.output
    folder = args.hub or args.diffusers
    if output.exists() and not args.force and not (folder and output.is_dir() and not any(output.iterdir())):
        raise ValueError(f"{output} exists; pass --force to overwrite it")
    if folder and output.exists():
        check_replaceable_export(output)
    ema = None if args.ema is None else EMA_CHOICES[args.ema]
    if folder:
        from pixelrepa.interop.hub import push_to_hub, require_token

        if args.push is not None:
            require_token(args.push)
        if args.hub:
            from pixelrepa.interop.hub import export_hub

            export_hub(args.checkpoint, output, ema, args.push)
            print(f"wrote {output}: model.safetensors, config.json, README.md (Hub layout)")
        else:
            from pixelrepa.interop.diffusers_export import export_diffusers

            export_diffusers(args.checkpoint, output, ema, args.push)
            print(f"wrote {output}: a diffusers pipeline (model_index.json, transformer/, scheduler/, remote code)")
        if args.push is not None:
            print(f"uploaded {output} to {push_to_hub(output, args.push, args.private)}")
        return 0
    if args.released and args.ema is not None:
        raise ValueError("--released writes the raw weights and both EMAs: leave --ema out")
    if ema == "raw":
        raise ValueError("--ema raw: a sampling model file takes an EMA (1 or 2); the raw weights go into "
                         "--hub / --diffusers exports, or into --released's 'model'")
    source = find_checkpoint(args.checkpoint)
    if args.released:
        from pixelrepa.interop.released import export_released

        export_released(source, output)
        print(f"wrote {output}: model (raw), model_ema1, model_ema2, optimizer, epoch, args from {source} "
              "(released layout)")
        return 0
    path = export_sampling_checkpoint(source, output, ema=ema or 1)
    print(f"wrote {path}: EMA {ema or 1} backbone from {source}")
    return 0


EXPORT_MARKERS = ("model.safetensors", "model_index.json")
"""Files that make a folder an earlier --hub or --diffusers export, which --force may replace whole."""


def check_replaceable_export(output: Path) -> None:
    """Refuse to replace `output` with a folder export unless it is empty or an earlier export: the new
    folder takes its place whole, so nothing else may be in it."""
    if not output.is_dir() or output.is_symlink():
        raise ValueError(f"{output} is not a folder: --hub / --diffusers write a folder, so give a new path")
    entries = sorted(entry.name for entry in output.iterdir())
    if entries and not any(name in entries for name in EXPORT_MARKERS):
        listed = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(f"{output} holds {listed}, not an earlier export, and an export replaces the whole "
                         "folder: move them out first, or export into another folder")
