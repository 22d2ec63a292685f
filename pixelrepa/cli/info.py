"""Print a preset's resolved configuration and parameter counts.

Networks are built on the meta device, so even G/16 costs no memory."""

from __future__ import annotations

import argparse
import json

import torch

from pixelrepa.align.heads import build_align_head
from pixelrepa.cli.common import add_config_arguments, resolve_config
from pixelrepa.config import list_presets, preset_note
from pixelrepa.models.jit import JiT, count_parameters


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default_preset=None)
    parser.add_argument("--list", action="store_true", help="list the registered presets")
    parser.add_argument("--json", action="store_true", help="print the resolved config as JSON")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_presets():
            note = preset_note(name)
            print(name if note is None else f"{name:<20} ({note})")
        return 0
    config = resolve_config(args)
    if args.json:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    with torch.device("meta"):
        net = JiT(config.model)
        head = build_align_head(config.model, config.align)
    m = config.model
    print(f"backbone      depth {m.depth}, width {m.hidden_size}, heads {m.num_heads}, patch {m.patch_size}, "
          f"{m.input_size} px, {m.num_patches} tokens, in-context {m.in_context_len} from block {m.in_context_start}")
    print(f"parameters    {count_parameters(net) / 1e6:.2f}M learnable "
          f"({count_parameters(net, include_fixed_tables=True) / 1e6:.2f}M with the fixed sin-cos table)")
    print(f"alignment     {config.align.mode}", end="")
    if head is None:
        print()
    else:
        a = config.align
        norm = (f", targets spatially z-scored (alpha {a.zscore_alpha:g})"
                if a.resolved_target_norm == "spatial_zscore" else "")
        print(f", tap after block {config.tap_block}, weight {a.weight}, "
              f"head {type(head).__name__} {count_parameters(head) / 1e6:.2f}M (training only){norm}")
    s = config.sampler
    print(f"sampler       {s.method} {s.steps} steps, CFG {s.cfg_scale} on ({s.interval_min}, {s.interval_max})")
    if getattr(args, "preset", None):
        print(f"provenance    {preset_note(args.preset) or 'published (SPEC 2, 3, 7)'}")
    return 0
