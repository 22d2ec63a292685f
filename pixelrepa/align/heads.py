"""Alignment heads on the backbone's tapped tokens (SPEC 5), dropped at sampling time.

- `MaskedTransformerAdapter` (PixelREPA): tokens with ~20% replaced by the backbone's
  mask token go through `depth` JiT blocks with their own conditioning and in-context
  tokens, then a projection head to the encoder's width.
- `MLPProjector` (REPA): Linear-SiLU-Linear-SiLU-Linear on the unmasked tokens.
- `ConvProjector` (iREPA): one k x k convolution over the token grid.

`normalize_targets` applies `align.target_norm` to the encoder's features at loss time (iREPA's
spatial z-score), so one target cache of raw features serves every mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelrepa.config import AlignConfig, JiTConfig
from pixelrepa.models.layers import (
    InContextTokens,
    JiTBlock,
    LabelEmbedder,
    TimestepEmbedder,
    init_jit_weights,
    rope_2d_tables,
)


def draw_keep_mask(num_images: int, num_tokens: int, mask_ratio: float,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """(N, T) bool, True = keep; each token is masked independently with prob. mask_ratio."""
    u = torch.rand(num_images, num_tokens, generator=generator, device=device)
    return u > mask_ratio


def apply_token_mask(tokens: Tensor, keep: Tensor, mask_token: Tensor) -> Tensor:
    """tokens where keep, else the learned mask token; gradients reach both. Under autocast
    bf16 tokens are promoted to the token's float32, as released (SPEC 7b)."""
    return torch.where(keep.unsqueeze(-1), tokens, mask_token)


class MaskedTransformerAdapter(nn.Module):
    """PixelREPA's adapter: JiT blocks of the backbone's width predicting encoder features."""

    def __init__(self, backbone: JiTConfig, align: AlignConfig):
        super().__init__()
        dim, out_dim = backbone.hidden_size, align.encoder.feature_dim
        self.in_context_len = align.adapter_in_context_len
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = LabelEmbedder(backbone.num_classes, dim)
        self.in_context = InContextTokens(self.in_context_len, dim)
        self.blocks = nn.ModuleList([
            JiTBlock(dim, backbone.num_heads, backbone.mlp_ratio, eps=backbone.norm_eps)
            for _ in range(align.adapter_depth)
        ])
        # Released quirk: with equal widths the head exists but is not applied.
        self.use_head = not (align.skip_head_if_same_width and dim == out_dim)
        self.head = nn.ModuleDict(dict(
            fc1=nn.Linear(dim, dim), norm=nn.LayerNorm(dim, eps=1e-5), fc2=nn.Linear(dim, out_dim),
        ))
        if not self.use_head:
            self.head.requires_grad_(False)  # kept for loading, never trained (no DDP unused params)
        cos, sin = rope_2d_tables(dim // backbone.num_heads, backbone.grid_size, num_prefix=self.in_context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_jit_weights(self)

    def forward(self, tokens: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """(N, T, D) already-masked tokens -> (N, T, encoder_dim)."""
        y_emb = self.y_embed(y)
        c = self.t_embed(t) + y_emb
        x = torch.cat([self.in_context(y_emb), tokens], dim=1)
        for block in self.blocks:
            x = block(x, c, self.rope_cos, self.rope_sin)
        x = x[:, self.in_context_len:]
        if self.use_head:
            x = self.head.fc2(F.silu(self.head.norm(self.head.fc1(x))))
        return x


class MLPProjector(nn.Module):
    """REPA's 3-layer MLP from the backbone width to the encoder width."""

    def __init__(self, backbone: JiTConfig, align: AlignConfig):
        super().__init__()
        hidden = align.projector_hidden
        self.net = nn.Sequential(
            nn.Linear(backbone.hidden_size, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, align.encoder.feature_dim),
        )
        init_jit_weights(self)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)


class ConvProjector(nn.Module):
    """iREPA's projector: a k x k convolution (stride 1, padding k // 2) over the tokens laid out
    on their (grid, grid) raster, from the backbone width to the encoder width. It keeps torch's
    default Conv2d initialisation, as the released iREPA code does."""

    def __init__(self, backbone: JiTConfig, align: AlignConfig):
        super().__init__()
        self.grid = backbone.grid_size
        kernel = align.projector_kernel
        self.conv = nn.Conv2d(backbone.hidden_size, align.encoder.feature_dim, kernel, padding=kernel // 2)

    def forward(self, tokens: Tensor) -> Tensor:
        n, num_tokens, dim = tokens.shape
        grid = tokens.transpose(1, 2).reshape(n, dim, self.grid, self.grid)  # (N, D, g, g), row-major
        return self.conv(grid).flatten(2).transpose(1, 2)                    # (N, T, C)


def build_align_head(backbone: JiTConfig, align: AlignConfig) -> nn.Module | None:
    """The head for `align.mode`: adapter, projector (`align.resolved_projector`), or None for
    plain JiT."""
    if align.mode == "pixelrepa":
        return MaskedTransformerAdapter(backbone, align)
    if align.mode in ("repa", "irepa"):
        return ConvProjector(backbone, align) if align.resolved_projector == "conv" else MLPProjector(backbone, align)
    return None


def spatial_zscore(features: Tensor, alpha: float, eps: float) -> Tensor:
    """iREPA's target normalisation over the token (spatial) axis of (N, T, C) features, per image
    and channel: (f - alpha * mean_T f) / (std_T f + eps), std with Bessel's correction (as
    torch.std and the released code)."""
    mean = features.mean(dim=1, keepdim=True)
    std = features.std(dim=1, keepdim=True)
    return (features - alpha * mean) / (std + eps)


def normalize_targets(target: Tensor, align: AlignConfig) -> Tensor:
    """The encoder features as the alignment loss compares them: float32, then
    `align.resolved_target_norm` (none, or iREPA's spatial z-score)."""
    target = target.float()
    if align.resolved_target_norm == "spatial_zscore":
        return spatial_zscore(target, align.zscore_alpha, align.zscore_eps)
    return target


def cosine_alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """mean over tokens and images of 1 - cos(pred, target), in float32 (SPEC 5)."""
    if pred.shape != target.shape:
        raise ValueError(f"alignment prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ; "
                         "the target grid must be resized to the backbone's token grid")
    pred = F.normalize(pred.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return (1 - (pred * target).sum(dim=-1)).mean()
