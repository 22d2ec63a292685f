"""The pieces of a JiT block (SPEC 3): norms, RoPE, attention, SwiGLU, embedders, adaLN block.

`JiTBlock` is the one transformer block of the project; the backbone and the Masked
Transformer Adapter are both stacks of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation; shift/scale are per sample (N, D), broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps), computed in float32 and returned in the input's
    dtype (bf16 under autocast, as released: SPEC 7b)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


# ---------------------------------------------------------------------------
# Position encodings
# ---------------------------------------------------------------------------

def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos table (grid*grid, dim), row-major tokens (SPEC 3).

    Channels [0, dim/2) encode the column, [dim/2, dim) the row; each half is
    [sin(pos*w_k)] ++ [cos(pos*w_k)], w_k = 10000^(-k/(dim/4)); float64 then float32.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def half(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([half(cols), half(rows)], dim=1).float()


def rope_2d_tables(head_dim: int, grid: int, num_prefix: int = 0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (num_prefix + grid*grid, head_dim) for 2-D RoPE (SPEC 3).

    The first half of a head's channels rotates with the token's row, the second half
    with its column; each half of size n = head_dim/2 uses f_j = 10000^(-2j/n) on the
    adjacent pair (2j, 2j+1). Prefix (in-context) tokens get cos=1, sin=0.
    """
    n = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, n, 2, dtype=torch.float32)[: n // 2] / n)
    pos = torch.arange(grid, dtype=torch.float32)
    axis = torch.outer(pos, freqs).repeat_interleave(2, dim=1)  # (grid, n)
    rows = axis[:, None, :].expand(grid, grid, n)
    cols = axis[None, :, :].expand(grid, grid, n)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    cos, sin = angles.cos(), angles.sin()
    if num_prefix:
        cos = torch.cat([torch.ones(num_prefix, head_dim), cos])
        sin = torch.cat([torch.zeros(num_prefix, head_dim), sin])
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x*cos + rot(x)*sin with rot(x0, x1, x2, x3, ...) = (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with qk RMSNorm and 2-D RoPE, no mask.

    `impl` is `KernelConfig.attention`, set from outside (`set_attention_impl`): 'reference'
    (the released dtype flow, SPEC 7b), 'sdpa' (torch's fused kernel), 'auto' (SDPA off the
    CPU, the reference form on it)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, seq, dim = x.shape
        qkv = self.qkv(x).view(n, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, seq, head_dim)
        q = apply_rope(self.q_norm(q), cos, sin)  # float32 tables: q, k float32 also under autocast
        k = apply_rope(self.k_norm(k), cos, sin)
        drop = self.attn_drop if self.training else 0.0
        if self.impl == "sdpa" or (self.impl == "auto" and q.device.type != "cpu"):
            # Fused kernels take one dtype: under autocast q and k are rounded to v's bf16 here.
            out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, dropout_p=drop)
        else:
            out = reference_attention(q, k, v, drop)
        out = out.transpose(1, 2).reshape(n, seq, dim)
        return self.proj_drop(self.proj(out))


def reference_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """The released attention (SPEC 7b): float32 logits (scaled after the product) and softmax
    with autocast off for the tensors' device, then the product with v in v's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        logits = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        probs = F.dropout(logits.softmax(dim=-1), p=dropout_p)
    return probs.to(v.dtype) @ v


ATTENTION_IMPLS = ("auto", "sdpa", "reference")


def set_attention_impl(module: nn.Module, impl: str) -> int:
    """Run every attention layer inside `module` with `impl` (see `Attention`); returns how many."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention '{impl}' ({' | '.join(ATTENTION_IMPLS)})")
    layers = [sub for sub in module.modules() if isinstance(sub, Attention)]
    for layer in layers:
        layer.impl = impl
    return len(layers)


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x); hidden m = int(int(D * mlp_ratio) * 2 / 3)."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0):
        super().__init__()
        hidden = int(int(dim * mlp_ratio) * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(gate) * value))


class JiTBlock(nn.Module):
    """adaLN-Zero pre-norm block: x += g_a*Attn(mod(norm x)); x += g_m*MLP(mod(norm x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop, eps)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_ratio, proj_drop)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


# ---------------------------------------------------------------------------
# Embedders and output layer
# ---------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """256 sinusoid features of the raw t in [0, 1] (cos first), then Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.fc2(F.silu(self.fc1(features)))


class LabelEmbedder(nn.Module):
    """A table of num_classes + 1 rows; row num_classes is the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


class BottleneckPatchEmbed(nn.Module):
    """p x p stride-p conv to a bottleneck (no bias), then 1x1 conv to D; row-major tokens."""

    def __init__(self, patch_size: int, in_channels: int, bottleneck: int, dim: int):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)  # (N, T, D)


class FinalLayer(nn.Module):
    """RMSNorm, adaLN shift/scale, Linear(D, p*p*C)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class InContextTokens(nn.Module):
    """L class tokens: y_emb repeated L times plus a learned per-position embedding."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, length, dim))

    def forward(self, y_emb: Tensor) -> Tensor:
        return y_emb.unsqueeze(1) + self.pos  # (N, L, D)


def init_jit_weights(module: nn.Module) -> None:
    """The paper's initialisation for any module built of these layers (SPEC 3).

    xavier-uniform linear (and conv, viewed as linear) weights with zero biases; label
    tables, timestep-MLP weights and in-context embeddings N(0, 0.02); every adaLN output
    layer zero; norms back to identity. Final-layer output and mask token are handled by
    their owners.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(sub.weight.view(sub.weight.shape[0], -1))
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
    for sub in module.modules():
        if isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)
        elif isinstance(sub, nn.LayerNorm):
            sub.reset_parameters()
        elif isinstance(sub, TimestepEmbedder):
            nn.init.normal_(sub.fc1.weight, std=0.02)
            nn.init.normal_(sub.fc2.weight, std=0.02)
        elif isinstance(sub, LabelEmbedder):
            nn.init.normal_(sub.table.weight, std=0.02)
        elif isinstance(sub, InContextTokens):
            nn.init.normal_(sub.pos, std=0.02)
        elif isinstance(sub, (JiTBlock, FinalLayer)):
            nn.init.zeros_(sub.ada.weight)
            nn.init.zeros_(sub.ada.bias)
