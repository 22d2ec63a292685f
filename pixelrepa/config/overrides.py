"""Reading configs: nested dicts and files into config dataclasses, dotted overrides, and the
fields that moved.

Nothing here imports the components (only `_MOVED_FIELDS` names their paths): it works on any
(nested, frozen) config dataclass, taking each field's type from its annotation.
`RunConfig.from_dict` and `RunConfig.replace` call it; `config_from_file` reads a JSON, YAML or
TOML file of (some of) a config's fields onto a base.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

_MOVED_FIELDS = {
    "model.attention": "kernels.attention",
    **{f"train.eval_{name}": f"eval.{name}"
       for name in ("every", "images", "ref", "encoder_ref", "seed", "batch", "align", "align_images")},
}
"""Fields that moved, old dotted path -> new: files are read with them moved (`moved_fields`);
an override of an old path is refused with the new path named."""


def moved_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A nested dict of config fields (a saved config, a config file) with each field found at an
    old path of `_MOVED_FIELDS` moved to its new path; a value already at the new path wins."""
    data = _copy_dicts(data)
    for old, new in _MOVED_FIELDS.items():
        *parents, leaf = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *parents, leaf = new.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, value)
    return data


def _copy_dicts(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a nested dict: the dicts copied, the other values shared."""
    return {key: _copy_dicts(value) if isinstance(value, dict) else value for key, value in data.items()}


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


def config_from_file(path: Path, base: Any) -> Any:
    """A full or partial config (JSON/YAML/TOML, fields that moved read at their new place)
    applied onto `base`."""
    return apply_overrides(base, flatten(moved_fields(read_config_file(path))))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A config dataclass from a nested dict of its fields (missing fields keep their defaults),
    each value coerced to its field's type."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    hints = _field_types(cls)
    return cls(**{key: _coerce(value, hints[key], key) for key, value in data.items()})


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, resolved (the module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of a (nested) config with dotted-path fields replaced.

    All changes to one component are applied together, so validation sees the final
    combination (e.g. a new width together with a new head count)."""
    tree: dict[str, Any] = {}
    for path, value in overrides.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config override '{path}' conflicts with another override")
        node[leaf] = (path, value)
    return _replace_tree(config, tree)


def _replace_tree(obj: Any, tree: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for name, sub in tree.items():
        if name not in names:
            path = sub[0] if isinstance(sub, tuple) else name
            moved = f"; it is now '{_MOVED_FIELDS[path]}'" if path in _MOVED_FIELDS else ""
            raise ValueError(f"unknown config field '{path}' ({type(obj).__name__} has: "
                             f"{', '.join(sorted(names))}){moved}")
        if isinstance(sub, tuple):
            path, value = sub
            changes[name] = _coerce(value, _field_types(type(obj))[name], path)
        else:
            changes[name] = _replace_tree(getattr(obj, name), sub)
    return dataclasses.replace(obj, **changes)


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """`value` (a --set string, a config-file value or a typed value) as the field's annotated
    type: bool, int (integral floats such as 1e3 included), float, str, a Literal, a tuple, a
    component config (or a dict of its fields), or None where the field allows it."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if isinstance(value, str) and any(typing.get_origin(o) is Literal and value.strip() in typing.get_args(o)
                                      for o in options):
        return value.strip()  # a choice named like None ('none' of align.target_norm) is that choice
    is_none = value is None or (isinstance(value, str) and value.strip().lower() == "none")
    if is_none and type(None) in options:
        return None
    for option in options:
        if option is not type(None):
            try:
                return _as_type(value, option, path)
            except (TypeError, ValueError):
                pass
    expected = " or ".join(_type_name(o) for o in options)
    raise ValueError(f"cannot use {value!r} for config field '{path}' (expected {expected})")


def _as_type(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    text = value.strip() if isinstance(value, str) else None
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if isinstance(value, dict):
            return from_dict(kind, value)
    elif origin is Literal:
        if value in typing.get_args(kind) or text in typing.get_args(kind):
            return value if text is None else text
    elif origin is tuple:
        items = [v for v in text.strip("()[]").split(",") if v.strip()] if text is not None else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(path)
        args = typing.get_args(kind)
        element_types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(element_types) != len(items):
            raise ValueError(path)
        return tuple(_as_type(item, t, path) for item, t in zip(items, element_types))
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text.lower() in ("1", "true", "yes", "on")
    elif kind is int:
        number = float(text) if text is not None else value
        if not isinstance(number, bool) and isinstance(number, (int, float)) and float(number).is_integer():
            return int(number)
    elif kind is float:
        number = float(text) if text is not None else value
        if not isinstance(number, bool) and isinstance(number, (int, float)):
            return float(number)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise TypeError(path)


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(kind))
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))
