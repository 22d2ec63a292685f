"""Optional dependencies: `optional_import(module, extra, purpose)` imports one or says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed; the message names the pip command."""


def optional_import(module: str, extra: str, purpose: str) -> ModuleType:
    """`module`, or `MissingExtra` naming `purpose` and `pip install 'pixelrepa[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs the `{module.split('.')[0]}` package: "
                           f"pip install 'pixelrepa[{extra}]'") from None
