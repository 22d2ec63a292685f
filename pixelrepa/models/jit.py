"""JiT: a plain pixel-space diffusion transformer predicting the clean image (SPEC 3).

Read top to bottom: embed patches and conditioning, run blocks (prepending in-context
class tokens before block `in_context_start`), drop those tokens, project to pixels.
`forward(..., tap=k)` also returns the image tokens after the first k blocks, which is
what representation alignment reads (SPEC 5) without a second pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pixelrepa.config import JiTConfig
from pixelrepa.models.layers import (
    BottleneckPatchEmbed,
    FinalLayer,
    InContextTokens,
    JiTBlock,
    LabelEmbedder,
    TimestepEmbedder,
    init_jit_weights,
    rope_2d_tables,
    sincos_pos_embed_2d,
)


class JiT(nn.Module):
    def __init__(self, config: JiTConfig):
        super().__init__()
        self.config = config
        dim, grid = config.hidden_size, config.grid_size
        head_dim = dim // config.num_heads

        self.patch_embed = BottleneckPatchEmbed(config.patch_size, config.in_channels, config.bottleneck_dim, dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid).unsqueeze(0))  # (1, T, D), fixed
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = LabelEmbedder(config.num_classes, dim)
        self.in_context = InContextTokens(config.in_context_len, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # used by the PixelREPA adapter

        # Dropout only in the middle half of the blocks (SPEC 3).
        quarter = config.depth // 4
        self.blocks = nn.ModuleList([
            JiTBlock(dim, config.num_heads, config.mlp_ratio,
                     attn_drop=config.attn_drop if quarter <= i < 3 * quarter else 0.0,
                     proj_drop=config.proj_drop if quarter <= i < 3 * quarter else 0.0,
                     eps=config.norm_eps)
            for i in range(config.depth)
        ])
        self.final_layer = FinalLayer(dim, config.patch_size, config.in_channels, config.norm_eps)

        cos, sin = rope_2d_tables(head_dim, grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        cos, sin = rope_2d_tables(head_dim, grid, num_prefix=config.in_context_len)
        self.register_buffer("rope_cos_ctx", cos, persistent=False)
        self.register_buffer("rope_sin_ctx", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_jit_weights(self)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- pieces ------------------------------------------------------------------

    def embed(self, z: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Image tokens (N, T, D), conditioning c = t_emb + y_emb (N, D), and y_emb.

        The position table is added in place, so under bf16 autocast the tokens stay bf16
        until the in-context tokens (float32) are concatenated (SPEC 7b)."""
        y_emb = self.y_embed(y)
        c = self.t_embed(t) + y_emb
        tokens = self.patch_embed(z)
        tokens += self.pos_embed
        return tokens, c, y_emb

    def run_blocks(self, x: Tensor, c: Tensor, y_emb: Tensor, start: int, stop: int) -> Tensor:
        """Blocks [start, stop); in-context tokens are prepended on reaching in_context_start."""
        for i in range(start, stop):
            if i == self.config.in_context_start:
                x = torch.cat([self.in_context(y_emb), x], dim=1)  # (N, L + T, D)
            if i >= self.config.in_context_start:
                x = self.blocks[i](x, c, self.rope_cos_ctx, self.rope_sin_ctx)
            else:
                x = self.blocks[i](x, c, self.rope_cos, self.rope_sin)
        return x

    def image_tokens(self, x: Tensor, after_block: int) -> Tensor:
        """Drop the in-context tokens if they were prepended before `after_block`."""
        return x[:, self.config.in_context_len:] if after_block > self.config.in_context_start else x

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*C) with (pi, pj, channel) order -> (N, C, H, W)."""
        n, p, g, ch = x.shape[0], self.config.patch_size, self.config.grid_size, self.config.in_channels
        x = x.view(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, ch, g * p, g * p)

    def head(self, x: Tensor, c: Tensor) -> Tensor:
        x = self.image_tokens(x, self.config.depth)
        return self.unpatchify(self.final_layer(x, c))

    # -- the one forward path ---------------------------------------------------

    def forward(self, z: Tensor, t: Tensor, y: Tensor, tap: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x_pred = net(z, t, y). With `tap=k`, also the image tokens after k blocks."""
        x, c, y_emb = self.embed(z, t, y)
        if tap is None:
            return self.head(self.run_blocks(x, c, y_emb, 0, self.config.depth), c)
        x = self.run_blocks(x, c, y_emb, 0, tap)
        tapped = self.image_tokens(x, tap)  # (N, T, D)
        x = self.run_blocks(x, c, y_emb, tap, self.config.depth)
        return self.head(x, c), tapped


def count_parameters(module: nn.Module, include_fixed_tables: bool = False) -> int:
    """Learnable parameters (131.12M for JiT-B/16); optionally plus the fixed sin-cos table,
    which the released code keeps as a frozen parameter (131.32M)."""
    total = sum(p.numel() for p in module.parameters())
    if include_fixed_tables:
        total += sum(b.numel() for name, b in module.named_buffers() if name.endswith("pos_embed"))
    return total
