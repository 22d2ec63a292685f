"""Sampling: the solvers over a denoiser (`solvers`) and reproducible image generation (`generate`)."""

from pixelrepa.sampling.generate import ClassLayout, class_layout, generate, image_noise, sample_classes
from pixelrepa.sampling.solvers import Denoiser, GuidedVelocity, guidance_scale, sample

__all__ = ["ClassLayout", "Denoiser", "GuidedVelocity", "class_layout", "generate", "guidance_scale", "image_noise",
           "sample", "sample_classes"]
