"""Alignment heads, token masking and the cosine loss (SPEC 5)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

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
from pixelrepa.config import AlignConfig, EncoderConfig, JiTConfig, RunConfig
from helpers import randomize_



def tiny(feature_dim: int = 48, mode: str = "pixelrepa", **align_changes) -> RunConfig:
    return RunConfig().replace(**{
        "model.input_size": 32, "model.patch_size": 8, "model.hidden_size": 64, "model.num_heads": 4,
        "model.depth": 4, "model.num_classes": 10, "model.bottleneck_dim": 16, "model.in_context_len": 4,
        "model.in_context_start": 1, "align.mode": mode, "align.adapter_in_context_len": 4,
        "align.projector_hidden": 96, "align.encoder.feature_dim": feature_dim,
        **{f"align.{k}": v for k, v in align_changes.items()},
    })


def head_inputs(cfg: RunConfig, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, cfg.model.num_patches, cfg.model.hidden_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.model.num_classes + 1, (n,), generator=g)
    return tokens, t, y


# ---------------------------------------------------------------------------
# Keep-mask and mask token
# ---------------------------------------------------------------------------

def test_keep_mask_ratio_statistics():
    g = torch.Generator().manual_seed(0)
    keep = draw_keep_mask(64, 4096, 0.2, generator=g)
    assert keep.shape == (64, 4096) and keep.dtype == torch.bool
    masked = 1 - keep.float().mean().item()
    assert abs(masked - 0.2) < 0.005  # 262k Bernoulli draws: std ~ 0.0008
    # Independent per image: every image has roughly 20% masked too.
    per_image = 1 - keep.float().mean(1)
    assert per_image.min() > 0.15 and per_image.max() < 0.25
    assert torch.all(draw_keep_mask(4, 100, 0.0, generator=g))
    half = 1 - draw_keep_mask(64, 4096, 0.5, generator=g).float().mean().item()
    assert abs(half - 0.5) < 0.005


def test_keep_mask_reproducible_with_generator():
    a = draw_keep_mask(3, 50, 0.2, generator=torch.Generator().manual_seed(5))
    b = draw_keep_mask(3, 50, 0.2, generator=torch.Generator().manual_seed(5))
    c = draw_keep_mask(3, 50, 0.2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_apply_token_mask_places_mask_token_and_passes_gradients():
    n, T, D = 3, 10, 8
    tokens = torch.randn(n, T, D, requires_grad=True)
    mask_token = (torch.randn(1, 1, D) * 0.02).requires_grad_()
    keep = draw_keep_mask(n, T, 0.4, generator=torch.Generator().manual_seed(1))
    assert keep.any() and (~keep).any()
    out = apply_token_mask(tokens, keep, mask_token)
    assert out.shape == tokens.shape
    for i in range(n):
        for j in range(T):
            expected = tokens[i, j] if keep[i, j] else mask_token[0, 0]
            assert torch.equal(out[i, j], expected)
    upstream = torch.randn(n, T, D)
    out.backward(upstream)
    expected_mask_grad = upstream[~keep].sum(0)
    torch.testing.assert_close(mask_token.grad[0, 0], expected_mask_grad)
    assert torch.all(tokens.grad[~keep] == 0)
    torch.testing.assert_close(tokens.grad[keep], upstream[keep])
    # bf16 tokens are promoted to the float32 mask token's dtype, as released (SPEC 7b).
    out16 = apply_token_mask(tokens.detach().bfloat16(), keep, mask_token.detach())
    assert out16.dtype == torch.float32
    assert torch.equal(out16[keep], tokens.detach().bfloat16().float()[keep])


# ---------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------

def test_build_align_head_by_mode():
    assert build_align_head(tiny(mode="none").model, tiny(mode="none").align) is None
    cfg = tiny(mode="repa")
    assert isinstance(build_align_head(cfg.model, cfg.align), MLPProjector)
    cfg = tiny(mode="pixelrepa")
    assert isinstance(build_align_head(cfg.model, cfg.align), MaskedTransformerAdapter)
    cfg = tiny(mode="irepa")
    assert isinstance(build_align_head(cfg.model, cfg.align), ConvProjector)
    # The projector is a setting: REPA with a conv projector, iREPA with REPA's MLP.
    assert isinstance(build_align_head(cfg.model, tiny(mode="repa", projector="conv").align), ConvProjector)
    assert isinstance(build_align_head(cfg.model, tiny(mode="irepa", projector="mlp").align), MLPProjector)


@pytest.mark.parametrize("feature_dim,skip,uses_head", [(64, True, False), (64, False, True), (48, True, True),
                                                        (48, False, True)])
def test_adapter_head_skipped_iff_same_width_and_switch(feature_dim, skip, uses_head):
    cfg = tiny(feature_dim=feature_dim, skip_head_if_same_width=skip)
    adapter = randomize_(MaskedTransformerAdapter(cfg.model, cfg.align), seed=2)
    assert adapter.use_head == uses_head
    tokens, t, y = head_inputs(cfg)
    out = adapter(tokens, t, y)
    assert out.shape == (tokens.shape[0], cfg.model.num_patches, feature_dim)
    # Changing the head's weights changes the output iff the head is applied.
    with torch.no_grad():
        adapter.head.fc2.weight.mul_(2.0)
    assert torch.equal(out, adapter(tokens, t, y)) != uses_head


def test_adapter_head_is_linear_layernorm_silu_linear():
    same = tiny(feature_dim=64, skip_head_if_same_width=True)
    with_head = tiny(feature_dim=64, skip_head_if_same_width=False)
    a = randomize_(MaskedTransformerAdapter(same.model, same.align), seed=3)
    b = MaskedTransformerAdapter(with_head.model, with_head.align)
    b.load_state_dict(a.state_dict())
    tokens, t, y = head_inputs(same)
    trunk = a(tokens, t, y)  # no head: the blocks' image tokens
    h = b.head
    expected = F.linear(F.silu(F.layer_norm(F.linear(trunk, h.fc1.weight, h.fc1.bias), (64,),
                                            h.norm.weight, h.norm.bias, eps=1e-5)), h.fc2.weight, h.fc2.bias)
    torch.testing.assert_close(b(tokens, t, y), expected, rtol=1e-5, atol=1e-6)


def test_adapter_structure():
    cfg = tiny()
    backbone = dataclasses.replace(cfg.model, attn_drop=0.2, proj_drop=0.2)
    adapter = MaskedTransformerAdapter(backbone, cfg.align)
    assert len(adapter.blocks) == cfg.align.adapter_depth
    for block in adapter.blocks:  # no dropout in the adapter, even for a dropout backbone
        assert block.attn.attn_drop == 0 and block.attn.proj_drop.p == 0 and block.mlp.drop.p == 0
        assert block.attn.num_heads == backbone.num_heads
        assert block.attn.qkv.in_features == backbone.hidden_size
    assert adapter.y_embed.table.num_embeddings == backbone.num_classes + 1
    assert adapter.in_context.pos.shape[1] == cfg.align.adapter_in_context_len
    assert adapter.rope_cos.shape[0] == cfg.align.adapter_in_context_len + backbone.num_patches
    assert torch.all(adapter.rope_cos[:cfg.align.adapter_in_context_len] == 1)
    assert torch.all(adapter.rope_sin[:cfg.align.adapter_in_context_len] == 0)
    # Every token's prediction depends on the other tokens (attention over the sequence),
    # and only image tokens come out.
    randomize_(adapter, seed=4)
    tokens, t, y = head_inputs(cfg)
    base = adapter(tokens, t, y)
    poked = tokens.clone()
    poked[:, 0] += 1.0
    assert not torch.allclose(adapter(poked, t, y)[:, 1:], base[:, 1:])
    # The label and the time condition the output.
    assert not torch.allclose(adapter(tokens, t, (y + 1) % backbone.num_classes), base)
    assert not torch.allclose(adapter(tokens, t * 0.5, y), base)


def test_adapter_in_context_tokens_prepended_then_removed():
    cfg = tiny(feature_dim=64, skip_head_if_same_width=True)  # no head: output = last block's image tokens
    adapter = randomize_(MaskedTransformerAdapter(cfg.model, cfg.align), seed=5)
    L = cfg.align.adapter_in_context_len
    seen = {}
    adapter.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args))
    adapter.blocks[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.detach()))
    tokens, t, y = head_inputs(cfg, n=3)
    out = adapter(tokens, t, y)
    x_in, c = seen["in"][0], seen["in"][1]
    expected_ctx = adapter.y_embed.table.weight[y][:, None] + adapter.in_context.pos
    torch.testing.assert_close(x_in[:, :L], expected_ctx.detach(), rtol=0, atol=0)
    torch.testing.assert_close(x_in[:, L:], tokens, rtol=0, atol=0)
    torch.testing.assert_close(c, adapter.t_embed(t) + adapter.y_embed.table.weight[y])
    torch.testing.assert_close(out, seen["out"][:, L:], rtol=0, atol=0)


def test_adapter_at_init_zero_adaln():
    cfg = tiny()
    adapter = MaskedTransformerAdapter(cfg.model, cfg.align)
    for block in adapter.blocks:
        assert torch.all(block.ada.weight == 0) and torch.all(block.ada.bias == 0)
    assert torch.all(adapter.head.fc1.bias == 0) and torch.all(adapter.head.fc2.bias == 0)


def test_repa_projector_shapes():
    cfg = tiny(mode="repa", feature_dim=40)
    proj = MLPProjector(cfg.model, cfg.align)
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    D, Hd, E = cfg.model.hidden_size, cfg.align.projector_hidden, cfg.align.encoder.feature_dim
    assert [(m.in_features, m.out_features) for m in linears] == [(D, Hd), (Hd, Hd), (Hd, E)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in proj.modules()) == 2
    tokens = torch.randn(3, cfg.model.num_patches, D)
    out = proj(tokens)
    assert out.shape == (3, cfg.model.num_patches, E)
    l1, l2, l3 = linears
    expected = l3(F.silu(l2(F.silu(l1(tokens)))))
    torch.testing.assert_close(out, expected)
    # Token-wise: no mixing across tokens.
    torch.testing.assert_close(proj(tokens[:, :1]), out[:, :1])


def test_repa_default_projector_width():
    assert AlignConfig().projector_hidden == 2048
    backbone = JiTConfig()
    with torch.device("meta"):
        proj = MLPProjector(backbone, AlignConfig(mode="repa", encoder=EncoderConfig(feature_dim=768)))
    shapes = [tuple(m.weight.shape) for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(2048, 768), (2048, 2048), (768, 2048)]


# ---------------------------------------------------------------------------
# iREPA: conv projector and spatial z-score
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [3, 1, 5])
def test_conv_projector_equals_conv2d_on_the_token_grid(kernel):
    cfg = tiny(mode="irepa", feature_dim=40, projector_kernel=kernel)
    proj = ConvProjector(cfg.model, cfg.align)
    g, D, E = cfg.model.grid_size, cfg.model.hidden_size, cfg.align.encoder.feature_dim
    tokens = torch.randn(3, g * g, D)
    out = proj(tokens)
    assert out.shape == (3, g * g, E)
    # Token i sits at row i // g, column i % g of the grid.
    grid = torch.stack([tokens[:, r * g:(r + 1) * g] for r in range(g)], dim=1).permute(0, 3, 1, 2)  # (N, D, g, g)
    expected = F.conv2d(grid, proj.conv.weight, proj.conv.bias, padding=kernel // 2)  # (N, E, g, g)
    for i in range(g * g):
        torch.testing.assert_close(out[:, i], expected[:, :, i // g, i % g])


def test_conv_projector_mixes_neighbouring_tokens_only():
    cfg = tiny(mode="irepa", feature_dim=8)
    proj = ConvProjector(cfg.model, cfg.align)
    g = cfg.model.grid_size
    tokens = torch.randn(1, g * g, cfg.model.hidden_size)
    changed = tokens.clone()
    changed[0, 0] += 1.0  # the top-left token
    moved = (proj(changed) - proj(tokens)).abs().amax(dim=-1)[0].view(g, g) > 0
    assert moved[:2, :2].all() and moved.sum() == 4  # a 3 x 3 kernel reaches the 2 x 2 corner only


def test_spatial_zscore_equals_a_direct_computation():
    feats = torch.randn(2, 6, 5, dtype=torch.float64) * 3 + 1
    out = spatial_zscore(feats, alpha=0.8, eps=1e-6)
    for n in range(2):
        for c in range(5):
            column = feats[n, :, c].tolist()
            mean = sum(column) / 6
            std = (sum((v - mean) ** 2 for v in column) / 5) ** 0.5  # Bessel's correction, as torch.std
            expected = [(v - 0.8 * mean) / (std + 1e-6) for v in column]
            assert out[n, :, c].tolist() == pytest.approx(expected, rel=1e-12)


def test_normalize_targets_follows_the_mode_and_the_setting():
    feats = torch.randn(2, 9, 4, dtype=torch.bfloat16)
    plain = normalize_targets(feats, tiny(mode="repa").align)
    assert plain.dtype == torch.float32 and torch.equal(plain, feats.float())
    scored = normalize_targets(feats, tiny(mode="irepa").align)
    torch.testing.assert_close(scored, spatial_zscore(feats.float(), 0.8, 1e-6))
    torch.testing.assert_close(normalize_targets(feats, tiny(mode="irepa", target_norm="none").align), feats.float())
    torch.testing.assert_close(normalize_targets(feats, tiny(mode="repa", target_norm="spatial_zscore",
                                                           zscore_alpha=1.0).align),
                               spatial_zscore(feats.float(), 1.0, 1e-6))


@pytest.mark.parametrize("changes,message", [
    (dict(mode="pixelrepa", projector="conv"), "has no projector"),
    (dict(mode="irepa", projector="linear"), "cannot use 'linear' for config field 'align.projector'"),
    (dict(mode="irepa", projector_kernel=2), "must be odd"),
    (dict(mode="irepa", target_norm="zscore"), "cannot use 'zscore'"),
    (dict(mode="irepa", zscore_eps=0.0), "zscore_eps must be positive"),
])
def test_irepa_settings_refuse_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


# ---------------------------------------------------------------------------
# Cosine loss
# ---------------------------------------------------------------------------

def test_cosine_loss_reference_values():
    x = torch.randn(2, 7, 16)
    assert cosine_alignment_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_alignment_loss(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert cosine_alignment_loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    e = torch.eye(16)
    a = e[:8].expand(2, 8, 16)
    b = e[8:].expand(2, 8, 16)
    assert cosine_alignment_loss(a, b).item() == pytest.approx(1.0, abs=1e-6)


def test_cosine_loss_is_mean_over_tokens_and_images():
    pred = torch.randn(3, 5, 8, dtype=torch.float64)
    target = torch.randn(3, 5, 8, dtype=torch.float64)
    per_token = torch.empty(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            p, q = pred[i, j], target[i, j]
            per_token[i, j] = 1 - (p @ q) / (p.norm() * q.norm())
    loss = cosine_alignment_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(per_token.mean().item(), abs=1e-6)


def test_cosine_loss_in_float32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    pred = (torch.randn(4, 64, 256, generator=g) * 30).bfloat16()
    target = (torch.randn(4, 64, 256, generator=g) + pred.float() * 0.05).bfloat16()
    loss = cosine_alignment_loss(pred, target)
    assert loss.dtype == torch.float32
    p, q = pred.double(), target.double()
    exact = (1 - (p * q).sum(-1) / (p.norm(dim=-1) * q.norm(dim=-1))).mean()
    assert abs(loss.item() - exact.item()) < 1e-5
    # Gradients flow back to bf16 inputs.
    pr = pred.clone().requires_grad_()
    cosine_alignment_loss(pr, target).backward()
    assert pr.grad.dtype == torch.bfloat16 and pr.grad.abs().sum() > 0


def test_cosine_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        cosine_alignment_loss(torch.randn(2, 16, 8), torch.randn(2, 9, 8))
    with pytest.raises(ValueError):
        cosine_alignment_loss(torch.randn(2, 16, 8), torch.randn(2, 16, 4))


def test_align_config_refuses_unknown_projector_and_norm_when_built_directly():
    with pytest.raises(ValueError, match="unknown align.projector 'linear'"):
        AlignConfig(mode="irepa", projector="linear")
    with pytest.raises(ValueError, match="unknown align.target_norm 'zscore'"):
        AlignConfig(mode="irepa", target_norm="zscore")
