"""pixelrepa: train, sample and evaluate JiT with no alignment, REPA or PixelREPA."""

from pixelrepa.config import RunConfig, get_preset, list_presets
from pixelrepa.models import JiT, create_model

__version__ = "0.1.0"

__all__ = ["JiT", "RunConfig", "create_model", "get_preset", "list_presets"]
