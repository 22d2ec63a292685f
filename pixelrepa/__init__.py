"""pixelrepa: train, sample and evaluate JiT with no alignment, REPA or PixelREPA."""

from pixelrepa.config import RunConfig, get_preset, list_presets
from pixelrepa.loading import LoadedModel, load_model
from pixelrepa.models import JiT, create_model
from pixelrepa.version import __version__

__all__ = ["JiT", "LoadedModel", "RunConfig", "__version__", "create_model", "get_preset", "list_presets", "load_model"]
