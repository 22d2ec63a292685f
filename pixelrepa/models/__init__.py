"""Backbone networks and the name -> model registry."""

from __future__ import annotations

from pixelrepa.config import JiTConfig, RunConfig, get_preset
from pixelrepa.models.jit import JiT, count_parameters


def create_model(spec: str | RunConfig | JiTConfig) -> JiT:
    """A JiT backbone from a preset name ('JiT-B/16', 'PixelREPA-Tiny/4', ...) or a config."""
    if isinstance(spec, str):
        spec = get_preset(spec)
    if isinstance(spec, RunConfig):
        spec = spec.model
    return JiT(spec)


__all__ = ["JiT", "count_parameters", "create_model"]
