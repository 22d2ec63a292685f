"""Representation alignment: heads on the tapped tokens, masks, target normalisation, the cosine loss."""

from pixelrepa.align.heads import (
    ConvProjector,
    MaskedTransformerAdapter,
    MLPProjector,
    apply_token_mask,
    build_align_head,
    cosine_alignment_loss,
    draw_keep_mask,
    normalize_targets,
    spatial_zscore,
)

__all__ = [
    "ConvProjector",
    "MLPProjector",
    "MaskedTransformerAdapter",
    "apply_token_mask",
    "build_align_head",
    "cosine_alignment_loss",
    "draw_keep_mask",
    "normalize_targets",
    "spatial_zscore",
]
