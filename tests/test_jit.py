"""The JiT backbone (SPEC 3): token flow, in-context tokens, tap, dropout placement,
initialisation, attention paths, parameter counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pixelrepa.align.heads import build_align_head
from pixelrepa.config import JiTConfig, get_preset, list_presets
from pixelrepa.models import create_model
from pixelrepa.models.jit import JiT, count_parameters
from pixelrepa.models.layers import set_attention_impl, sincos_pos_embed_2d
from helpers import randomize_



def micro(**changes) -> JiTConfig:
    """The Micro/8 backbone (grid 4, D 64, 4 heads, depth 4), optionally changed."""
    return dataclasses.replace(get_preset("PixelREPA-Micro/8").model, **changes)


def inputs(cfg: JiTConfig, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)
    return z, t, y


# ---------------------------------------------------------------------------
# In-context tokens and the tap
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("start", [0, 1, 2, 4])
def test_in_context_tokens_enter_at_start_block(start):
    cfg = micro(in_context_start=start)
    net = randomize_(JiT(cfg))
    T, L = cfg.num_patches, cfg.in_context_len
    lengths = {}
    for i, block in enumerate(net.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: lengths.__setitem__(i, args[0].shape[1]))
    z, t, y = inputs(cfg)
    out = net(z, t, y)
    assert out.shape == z.shape
    assert [lengths[i] for i in range(cfg.depth)] == [T if i < start else L + T for i in range(cfg.depth)]


@pytest.mark.parametrize("start", [1, 2])
def test_in_context_tokens_are_label_embedding_plus_position(start):
    cfg = micro(in_context_start=start)
    net = randomize_(JiT(cfg), seed=1)
    L = cfg.in_context_len
    seen = {}
    net.blocks[start].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    z, t, y = inputs(cfg, n=3)
    net(z, t, y)
    expected = net.y_embed.table.weight[y][:, None, :] + net.in_context.pos.view(1, L, -1)
    torch.testing.assert_close(seen["x"][:, :L], expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(seen["x"][:, L:], net(z, t, y, tap=start)[1].detach(), rtol=0, atol=0)
    # The learned position embedding is per position: the L tokens differ from each other.
    assert not torch.allclose(seen["x"][0, 0], seen["x"][0, 1])


def test_conditioning_is_t_emb_plus_y_emb():
    cfg = micro()
    net = randomize_(JiT(cfg), seed=2)
    seen = {}
    net.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("c", args[1].detach()))
    z, t, y = inputs(cfg)
    net(z, t, y)
    torch.testing.assert_close(seen["c"], (net.t_embed(t) + net.y_embed.table.weight[y]).detach())


def test_tap_returns_image_tokens_after_k_blocks():
    cfg = micro(depth=5, in_context_start=2)
    net = randomize_(JiT(cfg), seed=3)
    L = cfg.in_context_len
    outputs = {}
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach()))
    z, t, y = inputs(cfg)
    with torch.no_grad():
        plain = net(z, t, y)
        for k in range(1, cfg.depth + 1):
            x_pred, tapped = net(z, t, y, tap=k)
            assert (x_pred - plain).abs().max() <= 1e-6
            block_out = outputs[k - 1]
            image = block_out[:, L:] if k - 1 >= cfg.in_context_start else block_out
            assert tapped.shape == (z.shape[0], cfg.num_patches, cfg.hidden_size)
            torch.testing.assert_close(tapped, image, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Patch embedding, position table, unpatchify
# ---------------------------------------------------------------------------

def test_position_table_is_fixed_sincos_buffer():
    cfg = micro()
    net = JiT(cfg)
    assert "pos_embed" not in dict(net.named_parameters())
    torch.testing.assert_close(net.pos_embed[0], sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size), rtol=0, atol=0)
    z, t, y = inputs(cfg)
    tokens, _, _ = net.embed(z, t, y)
    torch.testing.assert_close(tokens, net.patch_embed(z) + net.pos_embed, rtol=0, atol=0)


def test_patch_embedding_bottleneck_and_row_major_order():
    cfg = micro()
    net = JiT(cfg)
    pe = net.patch_embed
    assert pe.proj1.weight.shape == (cfg.bottleneck_dim, cfg.in_channels, cfg.patch_size, cfg.patch_size)
    assert pe.proj1.bias is None
    assert pe.proj2.weight.shape == (cfg.hidden_size, cfg.bottleneck_dim, 1, 1) and pe.proj2.bias is not None
    p, g = cfg.patch_size, cfg.grid_size
    z = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    r, c = 1, 2
    z[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.randn(cfg.in_channels, p, p)
    tokens = pe(z)
    base = pe(torch.zeros_like(z))
    changed = (tokens - base).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [r * g + c]
    # The token equals the two convolutions written as matrix products.
    patch = z[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
    hidden = pe.proj1.weight.view(cfg.bottleneck_dim, -1) @ patch
    expected = pe.proj2.weight.view(cfg.hidden_size, -1) @ hidden + pe.proj2.bias
    torch.testing.assert_close(tokens[0, r * g + c], expected, rtol=1e-5, atol=1e-6)


def test_unpatchify_inverts_pi_pj_channel_layout():
    cfg = micro()
    net = JiT(cfg)
    p, g, ch = cfg.patch_size, cfg.grid_size, cfg.in_channels
    img = torch.randn(2, ch, cfg.input_size, cfg.input_size)
    tokens = torch.empty(2, g * g, p * p * ch)
    for r in range(g):
        for c in range(g):
            for pi in range(p):
                for pj in range(p):
                    for k in range(ch):
                        tokens[:, r * g + c, (pi * p + pj) * ch + k] = img[:, k, r * p + pi, c * p + pj]
    torch.testing.assert_close(net.unpatchify(tokens), img, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------

def test_zero_output_and_zero_adaln_at_init():
    cfg = micro()
    torch.manual_seed(0)
    net = JiT(cfg)
    for block in net.blocks:
        assert torch.all(block.ada.weight == 0) and torch.all(block.ada.bias == 0)
    fl = net.final_layer
    for t in (fl.ada.weight, fl.ada.bias, fl.linear.weight, fl.linear.bias):
        assert torch.all(t == 0)
    z, t, y = inputs(cfg)
    assert torch.all(net(z, t, y) == 0)


def test_init_distributions():
    cfg = micro(num_classes=1000, hidden_size=128, num_heads=4, depth=2, in_context_len=64)
    torch.manual_seed(0)
    net = JiT(cfg)

    def close_std(t, std, tol):
        assert abs(t.std().item() - std) < tol * std, (t.std().item(), std)
        assert abs(t.mean().item()) < 0.2 * std

    close_std(net.y_embed.table.weight, 0.02, 0.03)  # 1001 x 128 entries
    assert net.y_embed.table.weight.shape[0] == cfg.num_classes + 1
    close_std(net.t_embed.fc1.weight, 0.02, 0.03)
    close_std(net.t_embed.fc2.weight, 0.02, 0.05)
    close_std(net.in_context.pos, 0.02, 0.05)
    assert 0.01 < net.mask_token.std().item() < 0.03
    assert net.mask_token.shape[-1] == cfg.hidden_size
    assert torch.all(net.t_embed.fc1.bias == 0) and torch.all(net.t_embed.fc2.bias == 0)

    def xavier(weight_2d):
        fan_out, fan_in = weight_2d.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert weight_2d.abs().max().item() <= bound + 1e-7
        assert weight_2d.abs().max().item() > 0.95 * bound
        assert abs(weight_2d.std().item() - bound / math.sqrt(3)) < 0.06 * bound / math.sqrt(3)

    for block in net.blocks:
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.w12, block.mlp.w3):
            xavier(lin.weight)
            assert torch.all(lin.bias == 0)
    # Convolutions are initialised like linear layers over (out, in * k * k).
    w1 = net.patch_embed.proj1.weight
    xavier(w1.view(w1.shape[0], -1))
    w2 = net.patch_embed.proj2.weight
    xavier(w2.view(w2.shape[0], -1))
    assert torch.all(net.patch_embed.proj2.bias == 0)


def test_reset_parameters_deterministic_under_seed():
    cfg = micro()
    torch.manual_seed(123)
    a = JiT(cfg)
    torch.manual_seed(123)
    b = JiT(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    torch.manual_seed(7)
    a.reset_parameters()
    first = {k: v.clone() for k, v in a.state_dict().items()}
    torch.manual_seed(7)
    a.reset_parameters()
    for name, value in a.state_dict().items():
        assert torch.equal(value, first[name]), name
    torch.manual_seed(8)
    a.reset_parameters()
    assert not torch.equal(a.y_embed.table.weight, first["y_embed.table.weight"])
    assert torch.all(a.final_layer.linear.weight == 0)


def test_reset_parameters_is_a_full_reinitialisation():
    cfg = micro()
    net = JiT(cfg)
    torch.manual_seed(7)
    net.reset_parameters()
    first = {k: v.clone() for k, v in net.state_dict().items()}
    randomize_(net, seed=9)  # e.g. trained weights
    torch.manual_seed(7)
    net.reset_parameters()
    for name, value in net.state_dict().items():
        assert torch.equal(value, first[name]), name


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [8, 12])
def test_dropout_only_in_middle_blocks(depth):
    cfg = micro(depth=depth, hidden_size=32, num_heads=2, attn_drop=0.2, proj_drop=0.2, in_context_start=2)
    net = JiT(cfg)
    quarter = depth // 4
    for i, block in enumerate(net.blocks):
        expected = 0.2 if quarter <= i < 3 * quarter else 0.0
        assert block.attn.attn_drop == expected, i
        assert block.attn.proj_drop.p == expected, i
        assert block.mlp.drop.p == expected, i
    assert sum(block.attn.attn_drop > 0 for block in net.blocks) == 2 * quarter


@pytest.mark.parametrize("name", ["JiT-H/16", "JiT-H/32", "PixelREPA-H/16", "PixelREPA-H/32", "REPA-H/16",
                                  "REPA-H/32"])
def test_h_presets_drop_projections_not_attention_probabilities(name):
    """SPEC 3: the released H command sets only --proj_dropout 0.2."""
    with torch.device("meta"):
        net = create_model(get_preset(name))
    quarter = net.config.depth // 4
    for i, block in enumerate(net.blocks):
        assert block.attn.attn_drop == 0.0, i
        expected = 0.2 if quarter <= i < 3 * quarter else 0.0
        assert block.attn.proj_drop.p == expected and block.mlp.drop.p == expected, i


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_dropout_stochastic_in_train_deterministic_in_eval(impl):
    depth = 8
    cfg = micro(depth=depth, hidden_size=32, num_heads=2, attn_drop=0.2, proj_drop=0.2, in_context_start=2)
    net = randomize_(JiT(cfg), seed=4, std=0.2)
    assert set_attention_impl(net, impl) == depth
    quarter = depth // 4
    cos, sin = net.rope_cos, net.rope_sin
    x = torch.randn(2, cfg.num_patches, cfg.hidden_size)
    c = torch.randn(2, cfg.hidden_size)
    net.train()
    for i, block in enumerate(net.blocks):
        a, b = block(x, c, cos, sin), block(x, c, cos, sin)
        if quarter <= i < 3 * quarter:
            assert not torch.equal(a, b), i
        else:
            assert torch.equal(a, b), i
    z, t, y = inputs(cfg)
    assert not torch.equal(net(z, t, y), net(z, t, y))
    net.eval()
    assert torch.equal(net(z, t, y), net(z, t, y))
    # Attention-probability dropout on its own also acts only in train mode.
    block = net.blocks[quarter]
    block.attn.proj_drop.p = 0.0
    block.mlp.drop.p = 0.0
    block.train()
    assert not torch.equal(block(x, c, cos, sin), block(x, c, cos, sin))


# ---------------------------------------------------------------------------
# SDPA vs reference attention across the whole network
# ---------------------------------------------------------------------------

def test_sdpa_network_equals_reference_network():
    cfg = micro(in_context_start=2)
    fast = randomize_(JiT(cfg), seed=6, std=0.1)
    set_attention_impl(fast, "sdpa")
    ref = JiT(cfg)
    set_attention_impl(ref, "reference")
    ref.load_state_dict(fast.state_dict())
    z, t, y = inputs(cfg, n=3)
    out1, out2 = fast(z, t, y), ref(z, t, y)
    assert (out1 - out2).abs().max() <= 1e-6 * out2.abs().max()
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    g1, g2 = [], []
    for (name, p1), p2 in zip(fast.named_parameters(), ref.parameters()):
        if name == "mask_token":  # only the adapter uses it
            assert p1.grad is None and p2.grad is None
            continue
        # q/k-norm weight gradients are sums of cancelling terms: per tensor, 2e-5 relative.
        assert (p1.grad - p2.grad).norm() <= 2e-5 * p2.grad.norm() + 1e-12, name
        g1.append(p1.grad.flatten())
        g2.append(p2.grad.flatten())
    g1, g2 = torch.cat(g1), torch.cat(g2)
    assert (g1 - g2).norm() <= 1e-6 * g2.norm()


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,millions", [("JiT-B/16", 131.1), ("JiT-L/16", 459.0), ("JiT-H/16", 953.0)])
def test_backbone_parameter_counts(name, millions):
    with torch.device("meta"):
        net = create_model(name)
    count = count_parameters(net)
    assert count == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert abs(count / 1e6 - millions) <= 0.005 * millions, count


def test_mta_b16_parameter_count():
    cfg = get_preset("PixelREPA-B/16")
    with torch.device("meta"):
        head = build_align_head(cfg.model, cfg.align)
    count = sum(p.numel() for p in head.parameters())
    assert abs(count / 1e6 - 24.0) <= 0.005 * 24.0, count


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        net = JiT(cfg.model)
        head = build_align_head(cfg.model, cfg.align)
    assert len(net.blocks) == cfg.model.depth
    assert (head is None) == (cfg.align.mode == "none")
    if cfg.align.mode == "pixelrepa":
        assert len(head.blocks) == cfg.align.adapter_depth
