"""Representation alignment: heads on the tapped tokens, masks, the cosine loss."""

from pixelrepa.align.heads import (
    MaskedTransformerAdapter,
    MLPProjector,
    apply_token_mask,
    build_align_head,
    cosine_alignment_loss,
    draw_keep_mask,
)

__all__ = [
    "MLPProjector",
    "MaskedTransformerAdapter",
    "apply_token_mask",
    "build_align_head",
    "cosine_alignment_loss",
    "draw_keep_mask",
]
