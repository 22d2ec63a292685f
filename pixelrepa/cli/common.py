"""Helpers shared by commands: choosing a configuration from a preset, a file and overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixelrepa.config import RunConfig, apply_overrides, get_preset
from pixelrepa.interop.released import config_from_constructor_kwargs


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    parser.add_argument("--preset", default=default_preset, help="named preset, e.g. PixelREPA-B/16")
    parser.add_argument("--config", type=Path, help="a run config (JSON, YAML or TOML; with --preset, changes to it), or a parity-fixture config.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.depth=6 (repeatable)")


def read_config_file(path: Path) -> dict:
    """A JSON, YAML or TOML file as a nested dict."""
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as err:  # each parser has its own error type
        raise ValueError(f"cannot parse {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a mapping of config fields")
    return data


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{'model': {'depth': 6}} -> {'model.depth': 6}."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_from_file(path: Path, base: RunConfig | None = None) -> RunConfig:
    """A full or partial run config (JSON/YAML/TOML) applied onto `base` (default: RunConfig()),
    or a parity-fixture config.json (the released constructors' arguments)."""
    data = read_config_file(path)
    if "net" in data:
        constants = {k: data[k] for k in ("P_mean", "P_std", "t_eps", "noise_scale", "mask_ratio", "align_weight")
                     if k in data}
        return config_from_constructor_kwargs(data["net"], data.get("adapter"), **constants)
    return apply_overrides(base or RunConfig(), flatten(data))


def base_config(args: argparse.Namespace) -> RunConfig | None:
    """--preset, then --config (a full config, or changes to the preset); None without either."""
    base = get_preset(args.preset) if args.preset is not None else None
    if args.config is not None:
        return config_from_file(args.config, base)
    return base


def set_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The --set FIELD=VALUE pairs as dotted overrides."""
    overrides = {}
    for item in args.overrides:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}' is not FIELD=VALUE")
        overrides[field.strip()] = value
    return overrides


def resolve_config(args: argparse.Namespace, required: bool = True) -> RunConfig | None:
    """--preset, then --config (a full config, or changes to the preset), then --set overrides."""
    config = base_config(args)
    if config is None:
        if required:
            raise ValueError("a configuration is needed: --preset NAME and/or --config FILE")
        return None
    return apply_overrides(config, set_overrides(args))


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's config)")
    parser.add_argument("--method", choices=["heun", "euler"])
    parser.add_argument("--cfg", type=float, help="guidance scale")
    parser.add_argument("--interval", type=float, nargs=2, metavar=("MIN", "MAX"), help="guidance interval")


def sampler_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The sampler flags of `add_sampler_arguments` that were given, as dotted overrides."""
    overrides: dict[str, object] = {f"sampler.{field}": value
                                    for field, value in (("steps", args.steps), ("method", args.method),
                                                         ("cfg_scale", args.cfg)) if value is not None}
    if args.interval:
        overrides.update({"sampler.interval_min": args.interval[0], "sampler.interval_max": args.interval[1]})
    return overrides


def describe_sampler(config: RunConfig) -> str:
    s = config.sampler
    return f"{s.method} {s.steps} steps, CFG {s.cfg_scale} on ({s.interval_min}, {s.interval_max})"
