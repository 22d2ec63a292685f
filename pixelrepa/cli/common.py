"""Helpers shared by commands: choosing a configuration from a preset, a file and overrides;
one-line messages for file-system errors."""

from __future__ import annotations

import argparse
import errno
import os
import typing
from pathlib import Path

from pixelrepa.config import RunConfig, SamplerMethod, SamplerSchedule, apply_overrides, get_preset, read_config_file
from pixelrepa.config import config_from_file as run_config_from_file
from pixelrepa.interop.released import config_from_constructor_kwargs


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    parser.add_argument("--preset", default=default_preset, help="named preset, e.g. PixelREPA-B/16")
    parser.add_argument("--config", type=Path, help="a run config (JSON, YAML or TOML; with --preset, changes to it), or a parity-fixture config.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.depth=6 (repeatable)")


def config_from_file(path: Path, base: RunConfig | None = None) -> RunConfig:
    """A full or partial run config (JSON/YAML/TOML) applied onto `base` (default: RunConfig()),
    or a parity-fixture config.json (the released constructors' arguments)."""
    data = read_config_file(path)  # read again below unless it is a parity fixture: a few bytes
    if "net" in data:
        constants = {k: data[k] for k in ("P_mean", "P_std", "t_eps", "noise_scale", "mask_ratio", "align_weight")
                     if k in data}
        return config_from_constructor_kwargs(data["net"], data.get("adapter"), **constants)
    return run_config_from_file(path, base or RunConfig())


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
    parser.add_argument("--method", choices=typing.get_args(SamplerMethod),
                        help="solver: heun / euler as released, or the multistep dpm2m / dpm3m (one evaluation a step)")
    parser.add_argument("--schedule", choices=typing.get_args(SamplerSchedule),
                        help="time grid: uniform (as released), shifted (--shift), edm (--rho)")
    parser.add_argument("--shift", type=float, help="shifted grid: > 1 denser near the noise, < 1 near the data")
    parser.add_argument("--rho", type=float, help="edm grid: its rho (default 7)")
    parser.add_argument("--cfg", type=float, help="guidance scale")
    parser.add_argument("--interval", type=float, nargs=2, metavar=("MIN", "MAX"), help="guidance interval")


def sampler_changes(args: argparse.Namespace) -> dict[str, object]:
    """The sampler flags of `add_sampler_arguments` that were given, by SamplerConfig field."""
    given = (("steps", args.steps), ("method", args.method), ("schedule", args.schedule), ("shift", args.shift),
             ("rho", args.rho), ("cfg_scale", args.cfg))
    changes: dict[str, object] = {field: value for field, value in given if value is not None}
    if args.interval:
        changes.update({"interval_min": args.interval[0], "interval_max": args.interval[1]})
    return changes


def sampler_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The sampler flags of `add_sampler_arguments` that were given, as dotted overrides."""
    return {f"sampler.{field}": value for field, value in sampler_changes(args).items()}


def describe_sampler(config: RunConfig) -> str:
    s = config.sampler
    grid = {"uniform": "", "shifted": f" (shift {s.shift:g})", "edm": f" (edm rho {s.rho:g})"}[s.schedule]
    return f"{s.method} {s.steps} steps{grid}, CFG {s.cfg_scale} on ({s.interval_min}, {s.interval_max})"


def os_error_message(err: OSError) -> str:
    """A file-system error as one line: the path, what is wrong with it and what to do."""
    if err.filename is None:
        return str(err)  # raised with its own message
    moved = err.filename2 is not None and err.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    path = Path(os.fsdecode(err.filename2 if moved else err.filename))
    code = err.errno
    if code == errno.ENOENT:
        return f"{path} does not exist: check the path, or create its folder first"
    if code == errno.ENOTDIR:
        blocker = next((p for p in (*reversed(path.parents), path) if p.is_file()), None)
        if blocker is not None:
            return (f"{blocker} is a file, so {path} cannot be made or read under it: move the file away or "
                    "choose another path")
        return f"{path} passes through something that is not a folder: choose another path"
    if code == errno.EEXIST:
        what = "a file where a folder is needed" if path.is_file() else "in the way (it already exists)"
        return f"{path} is {what}: move it away or choose another path"
    if code in (errno.EISDIR, errno.ENOTEMPTY):
        return f"{path} is a folder where a file is needed: give a file's path, or move the folder away"
    if code in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied: give this user access (chmod / chown) or choose another path"
    if code == errno.EROFS:
        return f"{path} is on a read-only file system: choose a path on a writable one"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: no space left on its device (or quota): free some space or choose another path"
    return f"{path}: {err.strerror or err}"
