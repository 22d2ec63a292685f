"""JiT, the pixel-space diffusion transformer, as a diffusers model (written by `pixelrepa export
--diffusers`; needs torch and diffusers only).

`transformer(x_t, t, class_labels).sample` is the predicted clean image for images x_t at flow times
t in [0, 1] (0: noise, 1: image). Patches are embedded through a bottleneck, a fixed 2-D sin-cos table
is added, the blocks (adaLN-Zero, qk RMSNorm, 2-D RoPE, SwiGLU) run with `in_context_len` class tokens
prepended before block `in_context_start`, and the image tokens are projected back to pixels.

The configuration fields and weight names are those of diffusers' proposed `JiTTransformer2DModel`
(diffusers pull request 13098, unmerged), so that these weights should load into that class once it ships.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), computed in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def sincos_table(dim, grid):
    """(grid * grid, dim): channels [0, dim/2) encode the column, the rest the row, each as sin then cos."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    halves = [pos.reshape(-1, 1) * omega for pos in (cols, rows)]
    return torch.cat([torch.cat([a.sin(), a.cos()], dim=1) for a in halves], dim=1).float()


def rope_tables(head_dim, grid, num_prefix=0):
    """cos / sin (num_prefix + grid * grid, head_dim): the first half of a head rotates with the row, the
    second with the column, on adjacent channel pairs; prefix tokens are not rotated."""
    n = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, n, 2, dtype=torch.float32)[: n // 2] / n)
    axis = torch.outer(torch.arange(grid, dtype=torch.float32), freqs).repeat_interleave(2, dim=1)
    angles = torch.cat([axis[:, None, :].expand(grid, grid, n), axis[None, :, :].expand(grid, grid, n)], dim=-1)
    angles = angles.reshape(grid * grid, head_dim)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([torch.ones(num_prefix, head_dim), cos]), torch.cat([torch.zeros(num_prefix, head_dim), sin])


def apply_rope(x, cos, sin):
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class JiTAttention(nn.Module):
    def __init__(self, dim, heads, attn_drop, proj_drop, eps):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(dim // heads, eps), RMSNorm(dim // heads, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(proj_drop)])

    def forward(self, x, cos, sin):
        n, seq, dim = x.shape
        q, k, v = (proj(x).view(n, seq, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = apply_rope(self.norm_q(q), cos, sin), apply_rope(self.norm_k(k), cos, sin)
        out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.to_out[1](self.to_out[0](out.transpose(1, 2).reshape(n, seq, dim)))


class JiTSwiGLU(nn.Module):
    def __init__(self, dim, mlp_ratio, drop):
        super().__init__()
        hidden = int(int(dim * mlp_ratio) * 2 / 3)
        self.w12, self.w3, self.drop = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(gate) * value))


class JiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, attn_drop, proj_drop, eps):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn = JiTAttention(dim, heads, attn_drop, proj_drop, eps)
        self.mlp = JiTSwiGLU(dim, mlp_ratio, proj_drop)
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JiTPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, bottleneck_dim, dim):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, dim, 1)

    def forward(self, x):
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class JiTTimestepEmbedder(nn.Module):
    """256 sinusoids of the raw t (cos first, in float32), then Linear-SiLU-Linear in the weights' dtype."""

    def __init__(self, dim, frequencies=256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class JiTLabelEmbedder(nn.Module):
    """num_classes + 1 rows: the last is the null class of classifier-free guidance."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding_table(labels)


class JiTTransformer2DModel(ModelMixin, ConfigMixin):
    _no_split_modules = ["JiTBlock"]

    @register_to_config
    def __init__(self, sample_size=256, patch_size=16, in_channels=3, hidden_size=768, num_layers=12,
                 num_attention_heads=12, mlp_ratio=4.0, attention_dropout=0.0, dropout=0.0, num_classes=1000,
                 bottleneck_dim=128, in_context_len=32, in_context_start=4, norm_eps=1e-6):
        super().__init__()
        grid, head_dim = sample_size // patch_size, hidden_size // num_attention_heads
        self.x_embedder = JiTPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
        self.register_buffer("pos_embed", sincos_table(hidden_size, grid).unsqueeze(0))
        self.t_embedder = JiTTimestepEmbedder(hidden_size)
        self.y_embedder = JiTLabelEmbedder(num_classes, hidden_size)
        if in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        middle = range(num_layers // 4, 3 * (num_layers // 4))  # dropout in the middle half only
        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_attention_heads, mlp_ratio, attention_dropout if i in middle else 0.0,
                     dropout if i in middle else 0.0, norm_eps) for i in range(num_layers)])
        self.norm_final = RMSNorm(hidden_size, norm_eps)
        self.linear_final = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.adaLN_modulation_final = nn.Linear(hidden_size, 2 * hidden_size)
        for name, prefix in (("rope", 0), ("rope_in_context", in_context_len)):
            cos, sin = rope_tables(head_dim, grid, prefix)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    def forward(self, hidden_states, timestep, class_labels, return_dict=True):
        cfg = self.config
        y = self.y_embedder(class_labels)
        c = self.t_embedder(timestep) + y
        x = self.x_embedder(hidden_states)
        x = x + self.pos_embed.to(x.dtype)  # buffers keep float32 under from_pretrained(dtype=...)
        for i, block in enumerate(self.blocks):
            if i == cfg.in_context_start and cfg.in_context_len > 0:
                x = torch.cat([y.unsqueeze(1) + self.in_context_posemb, x], dim=1)
            if i >= cfg.in_context_start:
                x = block(x, c, self.rope_in_context_cos, self.rope_in_context_sin)
            else:
                x = block(x, c, self.rope_cos, self.rope_sin)
        if cfg.in_context_start < cfg.num_layers:
            x = x[:, cfg.in_context_len:]
        shift, scale = self.adaLN_modulation_final(F.silu(c)).chunk(2, dim=-1)
        x = self.linear_final(modulate(self.norm_final(x), shift, scale))
        n, p, g, ch = x.shape[0], cfg.patch_size, cfg.sample_size // cfg.patch_size, cfg.in_channels
        output = x.view(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(n, ch, g * p, g * p)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
