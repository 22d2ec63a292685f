"""The pieces of a JiT block against SPEC 3, each expectation built independently
(explicit loops over the definition) rather than by re-running the library code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixelrepa.models import layers
from pixelrepa.models.layers import (
    Attention,
    JiTBlock,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    modulate,
    reference_attention,
    rope_2d_tables,
    sincos_pos_embed_2d,
)
from helpers import randomize_



# ---------------------------------------------------------------------------
# Fixed 2-D sin-cos position table
# ---------------------------------------------------------------------------

def expected_sincos(dim: int, grid: int) -> torch.Tensor:
    q = dim // 4
    out = torch.zeros(grid * grid, dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            idx = r * grid + c  # row-major
            for k in range(q):
                w = 10000.0 ** (-k / q)
                out[idx, k] = math.sin(c * w)          # column, sin
                out[idx, q + k] = math.cos(c * w)      # column, cos
                out[idx, 2 * q + k] = math.sin(r * w)  # row, sin
                out[idx, 3 * q + k] = math.cos(r * w)  # row, cos
    return out


@pytest.mark.parametrize("dim,grid", [(16, 4), (32, 3), (64, 5)])
def test_sincos_table_matches_definition(dim, grid):
    table = sincos_pos_embed_2d(dim, grid)
    assert table.shape == (grid * grid, dim)
    assert table.dtype == torch.float32
    torch.testing.assert_close(table.double(), expected_sincos(dim, grid), rtol=0, atol=1e-6)


def test_sincos_halves_encode_column_then_row():
    dim, grid = 32, 4
    table = sincos_pos_embed_2d(dim, grid).view(grid, grid, dim)  # [row, col, ch]
    half = dim // 2
    # First half depends on the column only: identical down a column, varying along a row.
    for c in range(grid):
        for r in range(1, grid):
            assert torch.equal(table[r, c, :half], table[0, c, :half])
    assert not torch.allclose(table[0, 0, :half], table[0, 1, :half])
    # Second half depends on the row only.
    for r in range(grid):
        for c in range(1, grid):
            assert torch.equal(table[r, c, half:], table[r, 0, half:])
    assert not torch.allclose(table[0, 0, half:], table[1, 0, half:])
    # Position 0: sin block is 0, cos block is 1 (sin comes first).
    q = dim // 4
    origin = table[0, 0]
    assert torch.all(origin[:q] == 0) and torch.all(origin[q:2 * q] == 1)
    assert torch.all(origin[2 * q:3 * q] == 0) and torch.all(origin[3 * q:] == 1)


# ---------------------------------------------------------------------------
# 2-D RoPE
# ---------------------------------------------------------------------------

def expected_rope_angles(head_dim: int, grid: int) -> torch.Tensor:
    """(T, head_dim) angle per channel: first half by row, second half by column,
    theta_j = 10000^(-2j/d) on the adjacent pair (2j, 2j+1) of each half of size d."""
    d = head_dim // 2
    out = torch.zeros(grid * grid, head_dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            idx = r * grid + c
            for ch in range(head_dim):
                local = ch % d
                j = local // 2
                theta = 10000.0 ** (-2 * j / d)
                pos = r if ch < d else c
                out[idx, ch] = pos * theta
    return out


def rope_by_loop(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(x[2j], x[2j+1]) -> (x[2j] cos - x[2j+1] sin, x[2j+1] cos + x[2j] sin) per token."""
    x = x.double()
    out = torch.empty_like(x)
    for j in range(x.shape[-1] // 2):
        a = angles[:, 2 * j]
        assert torch.equal(a, angles[:, 2 * j + 1])
        cos, sin = a.cos(), a.sin()
        x0, x1 = x[..., 2 * j], x[..., 2 * j + 1]
        out[..., 2 * j] = x0 * cos - x1 * sin
        out[..., 2 * j + 1] = x1 * cos + x0 * sin
    return out


@pytest.mark.parametrize("head_dim,grid", [(8, 3), (16, 4), (32, 2)])
def test_rope_tables_match_definition(head_dim, grid):
    cos, sin = rope_2d_tables(head_dim, grid)
    angles = expected_rope_angles(head_dim, grid)
    assert cos.shape == sin.shape == (grid * grid, head_dim)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-5)


def test_rope_prefix_rows_are_identity():
    head_dim, grid, prefix = 16, 3, 5
    cos, sin = rope_2d_tables(head_dim, grid, num_prefix=prefix)
    plain_cos, plain_sin = rope_2d_tables(head_dim, grid)
    assert cos.shape == (prefix + grid * grid, head_dim)
    assert torch.all(cos[:prefix] == 1) and torch.all(sin[:prefix] == 0)
    assert torch.equal(cos[prefix:], plain_cos) and torch.equal(sin[prefix:], plain_sin)
    x = torch.randn(2, 3, prefix + grid * grid, head_dim)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[:, :, :prefix], x[:, :, :prefix])
    assert not torch.allclose(out[:, :, prefix:], x[:, :, prefix:])


@pytest.mark.parametrize("head_dim,grid", [(8, 3), (16, 4)])
def test_apply_rope_rotates_adjacent_pairs(head_dim, grid):
    torch.manual_seed(0)
    x = torch.randn(2, 3, grid * grid, head_dim)
    cos, sin = rope_2d_tables(head_dim, grid)
    expected = rope_by_loop(x, expected_rope_angles(head_dim, grid))
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), expected, rtol=0, atol=1e-5)


def test_rope_first_half_by_row_second_half_by_column():
    head_dim, grid = 16, 4
    d = head_dim // 2
    cos, sin = rope_2d_tables(head_dim, grid)
    x = torch.randn(1, 1, 1, head_dim).expand(1, 1, grid * grid, head_dim)  # same vector everywhere
    out = apply_rope(x, cos, sin)[0, 0].view(grid, grid, head_dim)  # [row, col, ch]
    for r in range(grid):
        for c in range(1, grid):
            # same row, different column: identical first half
            torch.testing.assert_close(out[r, c, :d], out[r, 0, :d], rtol=0, atol=0)
            assert not torch.allclose(out[r, c, d:], out[r, 0, d:])
    for c in range(grid):
        for r in range(1, grid):
            # same column, different row: identical second half
            torch.testing.assert_close(out[r, c, d:], out[0, c, d:], rtol=0, atol=0)
            assert not torch.allclose(out[r, c, :d], out[0, c, :d])
    # Rotation: the norm of every adjacent pair is preserved.
    pair_in = x[0, 0].view(grid * grid, -1, 2).norm(dim=-1)
    pair_out = out.reshape(grid * grid, -1, 2).norm(dim=-1)
    torch.testing.assert_close(pair_out, pair_in, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    head_dim, grid = 16, 5
    cos, sin = rope_2d_tables(head_dim, grid)
    q = torch.randn(head_dim)
    k = torch.randn(head_dim)
    rq = apply_rope(q.expand(grid * grid, head_dim), cos, sin).view(grid, grid, head_dim)
    rk = apply_rope(k.expand(grid * grid, head_dim), cos, sin).view(grid, grid, head_dim)
    # (r, c) vs (r + 1, c + 2) has the same score everywhere it exists.
    ref = (rq[0, 0] * rk[1, 2]).sum()
    for r in range(grid - 1):
        for c in range(grid - 2):
            torch.testing.assert_close((rq[r, c] * rk[r + 1, c + 2]).sum(), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------

def test_timestep_features_raw_t_cos_first():
    dim = 32
    emb = randomize_(TimestepEmbedder(dim), seed=1)
    seen = {}
    emb.fc1.register_forward_pre_hook(lambda m, args: seen.__setitem__("features", args[0].detach()))
    t = torch.tensor([0.0, 0.3, 0.77, 1.0])
    out = emb(t)
    feats = seen["features"]
    assert feats.shape == (4, 256)
    expected = torch.zeros(4, 256, dtype=torch.float64)
    for i, ti in enumerate(t.tolist()):
        for k in range(128):
            f = math.exp(-math.log(10000) * k / 128)
            expected[i, k] = math.cos(ti * f)
            expected[i, 128 + k] = math.sin(ti * f)
    torch.testing.assert_close(feats.double(), expected, rtol=0, atol=1e-5)
    # t = 0: the cos block is 1 and the sin block 0.
    assert torch.all(feats[0, :128] == 1) and torch.all(feats[0, 128:] == 0)
    # Then Linear, SiLU, Linear.
    manual = emb.fc2(F.silu(emb.fc1(expected.float())))
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Norm, modulation, SwiGLU
# ---------------------------------------------------------------------------

def test_rmsnorm_float32_with_weight():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1, 9, dtype=torch.float32))
    x = torch.randn(3, 5, 8) * 4
    xd = x.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-6, atol=1e-6)
    # bf16 input: normalised and weighted in float32, then cast back to bf16 (SPEC 7b).
    xb = x.bfloat16()
    out = norm(xb)
    xf = xb.float()
    ref = (norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # eps matters for tiny inputs.
    tiny = torch.full((1, 8), 1e-4)
    expected_tiny = 1e-4 / math.sqrt(1e-8 + 1e-6)
    torch.testing.assert_close(RMSNorm(8)(tiny), torch.full((1, 8), expected_tiny), rtol=1e-5, atol=0)


def test_modulate():
    x = torch.randn(2, 3, 4)
    shift, scale = torch.randn(2, 4), torch.randn(2, 4)
    out = modulate(x, shift, scale)
    for n in range(2):
        for tkn in range(3):
            torch.testing.assert_close(out[n, tkn], x[n, tkn] * (1 + scale[n]) + shift[n])


@pytest.mark.parametrize("dim,expected_hidden", [(768, 2048), (64, 170), (1024, 2730), (1280, 3413)])
def test_swiglu_hidden_size(dim, expected_hidden):
    with torch.device("meta"):
        mlp = SwiGLU(dim, 4.0)
    assert mlp.w12.weight.shape == (2 * expected_hidden, dim)
    assert mlp.w3.weight.shape == (dim, expected_hidden)


def test_swiglu_gate_is_first_half():
    dim = 64
    mlp = randomize_(SwiGLU(dim, 4.0), seed=3)
    m = mlp.w3.in_features
    x = torch.randn(2, 5, dim)
    w, b = mlp.w12.weight, mlp.w12.bias
    a = x @ w[:m].T + b[:m]
    v = x @ w[m:].T + b[m:]
    expected = (F.silu(a) * v) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
    swapped = (F.silu(v) * a) @ mlp.w3.weight.T + mlp.w3.bias
    assert not torch.allclose(mlp(x), swapped, atol=1e-3)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

def attention_by_definition(attn: Attention, x: torch.Tensor, angles: torch.Tensor, prefix: int) -> torch.Tensor:
    """Independent float64 attention: qkv, per-head RMSNorm on q/k, RoPE, softmax, proj."""
    n, seq, dim = x.shape
    h, hd = attn.num_heads, attn.head_dim
    xd = x.double()
    qkv = xd @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]

    def heads(t):
        return t.view(n, seq, h, hd).transpose(1, 2)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()

    q, k, v = heads(q), heads(k), heads(v)
    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    full = torch.cat([torch.zeros(prefix, hd, dtype=torch.float64), angles])
    q, k = rope_by_loop(q, full), rope_by_loop(k, full)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(n, seq, dim)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


@pytest.mark.parametrize("impl", ["auto", "sdpa", "reference"])
def test_attention_matches_definition(impl):
    dim, heads, grid, prefix = 32, 2, 3, 2
    attn = randomize_(Attention(dim, heads, impl=impl), seed=5, std=0.2)
    with torch.no_grad():  # non-trivial q/k norm weights
        attn.q_norm.weight.add_(1.0)
        attn.k_norm.weight.add_(1.0)
    cos, sin = rope_2d_tables(dim // heads, grid, num_prefix=prefix)
    x = torch.randn(2, prefix + grid * grid, dim)
    expected = attention_by_definition(attn, x, expected_rope_angles(dim // heads, grid), prefix)
    torch.testing.assert_close(attn(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_equals_reference_forward_and_grad():
    dim, heads, grid, prefix = 64, 4, 4, 4
    torch.manual_seed(0)
    fast = randomize_(Attention(dim, heads, impl="sdpa"), seed=7, std=0.2)
    ref = Attention(dim, heads, impl="reference")
    ref.load_state_dict(fast.state_dict())
    cos, sin = rope_2d_tables(dim // heads, grid, num_prefix=prefix)
    x = torch.randn(3, prefix + grid * grid, dim)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = fast(x1, cos, sin), ref(x2, cos, sin)
    scale = out2.abs().max()
    assert (out1 - out2).abs().max() <= 1e-6 * scale
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    assert (x1.grad - x2.grad).abs().max() <= 1e-5 * x2.grad.abs().max()
    for (name, p1), p2 in zip(fast.named_parameters(), ref.parameters()):
        assert (p1.grad - p2.grad).abs().max() <= 1e-5 * p2.grad.abs().max(), name


@pytest.mark.parametrize("device, expected", [("cpu", "explicit"), ("meta", "sdpa")])
def test_auto_attention_is_explicit_on_the_cpu_and_sdpa_elsewhere(monkeypatch, device, expected):
    called = []
    sdpa, explicit = layers.F.scaled_dot_product_attention, layers.reference_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda *a, **k: called.append("sdpa") or sdpa(*a, **k))
    monkeypatch.setattr(layers, "reference_attention", lambda *a, **k: called.append("explicit") or explicit(*a, **k))
    attn = Attention(32, 2, impl="auto").to(device)
    cos, sin = (t.to(device) for t in rope_2d_tables(16, 3))
    attn(torch.randn(2, 9, 32, device=device), cos, sin)
    assert called == [expected]


def test_reference_attention_is_float32_softmax():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    expected = ((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8)).softmax(-1) @ v.double()
    torch.testing.assert_close(reference_attention(q, k, v).double(), expected, rtol=1e-5, atol=1e-6)
    out = reference_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# adaLN block
# ---------------------------------------------------------------------------

def test_block_adaln_chunk_order():
    """ada(SiLU(c)) = shift_a, scale_a, gate_a, shift_m, scale_m, gate_m."""
    dim, heads, grid = 32, 2, 2
    block = randomize_(JiTBlock(dim, heads), seed=11, std=0.2)
    cos, sin = rope_2d_tables(dim // heads, grid)
    x = torch.randn(2, grid * grid, dim)
    c = torch.randn(2, dim)

    def set_chunks(values):
        with torch.no_grad():
            block.ada.weight.zero_()
            block.ada.bias.copy_(torch.cat([torch.full((dim,), float(v)) for v in values]))

    set_chunks([0, 0, 0, 0, 0, 0])  # zero gates: identity
    torch.testing.assert_close(block(x, c, cos, sin), x, rtol=0, atol=0)

    set_chunks([0.5, -0.25, 2.0, 0, 0, 0])  # attention branch only
    mod = block.norm1(x) * (1 - 0.25) + 0.5
    torch.testing.assert_close(block(x, c, cos, sin), x + 2.0 * block.attn(mod, cos, sin), rtol=1e-5, atol=1e-6)

    set_chunks([0, 0, 0, 0.3, 0.7, -1.5])  # MLP branch only
    mod = block.norm2(x) * 1.7 + 0.3
    torch.testing.assert_close(block(x, c, cos, sin), x - 1.5 * block.mlp(mod), rtol=1e-5, atol=1e-6)

    # Conditioning goes through SiLU before the adaLN linear.
    randomize_(block, seed=12, std=0.2)
    shift1, scale1, gate1, shift2, scale2, gate2 = (F.silu(c) @ block.ada.weight.T + block.ada.bias).chunk(6, -1)
    h = x + gate1[:, None] * block.attn(block.norm1(x) * (1 + scale1[:, None]) + shift1[:, None], cos, sin)
    h = h + gate2[:, None] * block.mlp(block.norm2(h) * (1 + scale2[:, None]) + shift2[:, None])
    torch.testing.assert_close(block(x, c, cos, sin), h, rtol=1e-5, atol=1e-6)
