"""Helpers shared by commands: choosing a configuration from a preset, a file and overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixelrepa.config import RunConfig, apply_overrides, get_preset
from pixelrepa.interop.released import config_from_constructor_kwargs


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    parser.add_argument("--preset", default=default_preset, help="named preset, e.g. PixelREPA-B/16")
    parser.add_argument("--config", type=Path, help="a run config JSON (or a parity-fixture config.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.depth=6 (repeatable)")


def config_from_file(path: Path) -> RunConfig:
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if "net" in data:  # the released constructors' arguments, as in the parity fixtures
        constants = {k: data[k] for k in ("P_mean", "P_std", "t_eps", "noise_scale", "mask_ratio", "align_weight")
                     if k in data}
        return config_from_constructor_kwargs(data["net"], data.get("adapter"), **constants)
    return RunConfig.from_dict(data)


def resolve_config(args: argparse.Namespace, required: bool = True) -> RunConfig | None:
    if args.config is not None and args.preset is not None:
        raise ValueError("give either --preset or --config, not both")
    if args.config is not None:
        config = config_from_file(args.config)
    elif args.preset is not None:
        config = get_preset(args.preset)
    elif required:
        raise ValueError("a configuration is needed: --preset NAME or --config FILE")
    else:
        return None
    overrides = {}
    for item in args.overrides:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}' is not FIELD=VALUE")
        overrides[field.strip()] = value
    return apply_overrides(config, overrides)
