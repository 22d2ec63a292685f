"""Sampling: the solvers over a denoiser (`solvers`), their time grids (`schedules`) and reproducible
image generation (`generate`)."""

from pixelrepa.sampling.generate import ClassLayout, class_layout, generate, image_noise, sample_classes
from pixelrepa.sampling.schedules import time_grid
from pixelrepa.sampling.solvers import Denoiser, GuidedVelocity, check_guide, guidance_scale, sample

__all__ = ["ClassLayout", "Denoiser", "GuidedVelocity", "check_guide", "class_layout", "generate", "guidance_scale",
           "image_noise", "sample", "sample_classes", "time_grid"]
