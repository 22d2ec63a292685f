"""The training objective (SPEC 4, 5): draws, velocity loss, alignment term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelrepa.align.heads import build_align_head
from pixelrepa.config import RunConfig, get_preset
from pixelrepa.models.jit import JiT
from pixelrepa.objective import Draws, draw_randomness, training_loss, velocity
from helpers import randomize_



def setup(mode: str, seed: int = 0, randomize: bool = True, **overrides):
    cfg = get_preset("PixelREPA-Micro/8").replace(**{"align.mode": mode, "align.encoder.feature_dim": 24,
                                                        **overrides})
    torch.manual_seed(seed)
    net = JiT(cfg.model)
    head = build_align_head(cfg.model, cfg.align)
    if randomize:
        randomize_(net, seed + 1)
        if head is not None:
            randomize_(head, seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    n = 3
    x = torch.rand(n, 3, cfg.model.input_size, cfg.model.input_size, generator=g) * 2 - 1
    y = torch.randint(0, cfg.model.num_classes, (n,), generator=g)
    draws = draw_randomness(x, y, cfg.model.num_classes, cfg.model.num_patches, cfg.objective, cfg.align, g)
    target = torch.randn(n, cfg.model.num_patches, cfg.align.encoder.feature_dim, generator=g)
    return cfg, net, head, x, y, draws, target


def loss(cfg, net, head, x, draws, target, **kw):
    return training_loss(net, head, x, draws, cfg.objective, cfg.align, cfg.tap_block, target, **kw)


# ---------------------------------------------------------------------------
# velocity and the interpolation
# ---------------------------------------------------------------------------

def test_velocity_definition_and_clamp():
    z = torch.randn(4, 3, 2, 2)
    x_pred = torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.0, 0.5, 0.97, 1.0])
    v = velocity(x_pred, z, t, 0.05)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(v[i], (x_pred[i] - z[i]) / max(1 - ti, 0.05))


def test_interpolation_endpoints_give_known_targets():
    """At t = 1, z = x and v = 0 (the loss reduces to (x_pred - x)^2 / t_eps^2); at t = 0,
    z = e and v = x - e."""
    cfg, net, head, x, y, draws, target = setup("none")
    e = draws.noise
    for t_value, v_expected in ((1.0, torch.zeros_like(x)), (0.0, x - e)):
        d = Draws(t=torch.full((x.shape[0],), t_value), noise=e, labels=draws.labels)
        z = t_value * x + (1 - t_value) * e
        x_pred = net(z, d.t, d.labels).detach()
        v_pred = (x_pred - z) / max(1 - t_value, cfg.objective.t_eps)
        expected = (v_expected - v_pred).pow(2).mean()
        out = loss(cfg, net, None, x, d, None)
        assert out["denoise"].item() == pytest.approx(expected.item(), rel=1e-5)
    # t = 1: the network sees the clean image.
    seen = {}
    handle = net.patch_embed.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0]))
    loss(cfg, net, None, x, Draws(t=torch.ones(x.shape[0]), noise=e, labels=draws.labels), None)
    handle.remove()
    torch.testing.assert_close(seen["z"], x)


def test_denoise_loss_with_zero_output_network():
    """At init x_pred == 0, so v - v_pred = x / max(1 - t, t_eps) whatever the noise."""
    cfg, net, head, x, y, draws, target = setup("none", randomize=False)
    out = loss(cfg, net, None, x, draws, None)
    denom = (1 - draws.t).clamp_min(cfg.objective.t_eps).view(-1, 1, 1, 1)
    expected = (x / denom).pow(2).mean()
    assert out["denoise"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_denoise_loss_matches_definition():
    cfg, net, head, x, y, draws, target = setup("none", seed=4)
    draws = Draws(t=torch.tensor([0.2, 0.6, 0.99]), noise=draws.noise, labels=torch.tensor([1, 10, 3]))
    t = draws.t.view(-1, 1, 1, 1)
    z = t * x + (1 - t) * draws.noise
    x_pred = net(z, draws.t, draws.labels)
    denom = torch.maximum(1 - t, torch.tensor(cfg.objective.t_eps))
    per_image = (((x - z) / denom - (x_pred - z) / denom) ** 2).flatten(1).mean(1)
    out = loss(cfg, net, None, x, draws, None)
    assert out["denoise"].item() == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert out["denoise"].dtype == torch.float32


# ---------------------------------------------------------------------------
# determinism and composition of the total
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pixelrepa", "repa", "none"])
def test_loss_is_deterministic_given_draws(mode):
    cfg, net, head, x, y, draws, target = setup(mode)
    a = loss(cfg, net, head, x, draws, target if head else None)
    b = loss(cfg, net, head, x, draws, target if head else None)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode,weight", [("pixelrepa", 0.1), ("pixelrepa", 0.7), ("repa", 0.5)])
def test_total_is_denoise_plus_weighted_align(mode, weight):
    cfg, net, head, x, y, draws, target = setup(mode, **{"align.weight": weight})
    out = loss(cfg, net, head, x, draws, target)
    assert set(out) == {"denoise", "align", "total"}
    assert out["align"].item() > 0
    torch.testing.assert_close(out["total"], out["denoise"] + weight * out["align"])


def test_pixelrepa_align_term_matches_definition():
    cfg, net, head, x, y, draws, target = setup("pixelrepa", seed=5)
    assert draws.keep is not None and (~draws.keep).any()
    t = draws.t.view(-1, 1, 1, 1)
    z = t * x + (1 - t) * draws.noise
    _, tapped = net(z, draws.t, draws.labels, tap=cfg.tap_block)
    masked = torch.where(draws.keep[..., None], tapped, net.mask_token.expand_as(tapped))
    pred = head(masked, draws.t, draws.labels)
    expected = (1 - F.cosine_similarity(pred.double(), target.double(), dim=-1)).mean()
    out = loss(cfg, net, head, x, draws, target)
    assert out["align"].item() == pytest.approx(expected.item(), rel=1e-5)
    # The mask matters: with no masking the align term changes.
    no_mask = Draws(t=draws.t, noise=draws.noise, labels=draws.labels, keep=torch.ones_like(draws.keep))
    assert loss(cfg, net, head, x, no_mask, target)["align"].item() != pytest.approx(out["align"].item(), rel=1e-4)


def test_repa_align_term_matches_definition():
    cfg, net, head, x, y, draws, target = setup("repa", seed=6)
    t = draws.t.view(-1, 1, 1, 1)
    z = t * x + (1 - t) * draws.noise
    _, tapped = net(z, draws.t, draws.labels, tap=cfg.tap_block)
    expected = (1 - F.cosine_similarity(head(tapped).double(), target.double(), dim=-1)).mean()
    out = loss(cfg, net, head, x, draws, target)
    assert out["align"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradients_reach_backbone_mask_token_and_adapter():
    cfg, net, head, x, y, draws, target = setup("pixelrepa", seed=7)
    out = loss(cfg, net, head, x, draws, target)
    out["total"].backward()
    assert net.mask_token.grad is not None and net.mask_token.grad.abs().sum() > 0
    assert head.use_head
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The align term reaches the blocks before the tap.
    net.zero_grad()
    loss(cfg, net, head, x, draws, target)["align"].backward()
    assert net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.blocks[-1].attn.qkv.weight.grad is None or net.blocks[-1].attn.qkv.weight.grad.abs().sum() == 0


def test_plain_jit_total_equals_denoise():
    cfg, net, head, x, y, draws, target = setup("none")
    assert head is None and draws.keep is None
    out = loss(cfg, net, None, x, draws, None)
    assert set(out) == {"denoise", "total"}
    assert torch.equal(out["total"], out["denoise"])


def test_missing_targets_or_keep_raise():
    cfg, net, head, x, y, draws, target = setup("pixelrepa")
    with pytest.raises(ValueError):
        loss(cfg, net, head, x, draws, None)
    with pytest.raises(ValueError):
        loss(cfg, net, head, x, Draws(t=draws.t, noise=draws.noise, labels=draws.labels, keep=None), target)


# ---------------------------------------------------------------------------
# draw_randomness
# ---------------------------------------------------------------------------

def test_draws_reproducible_with_seeded_generator():
    cfg = get_preset("PixelREPA-Micro/8")
    x = torch.zeros(5, 3, 8, 8)
    y = torch.arange(5)

    def draw(seed):
        return draw_randomness(x, y, 10, 16, cfg.objective, cfg.align, torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    for field in ("t", "noise", "labels", "keep"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.t, c.t) and not torch.equal(a.noise, c.noise)
    assert a.keep.shape == (5, 16)


def test_draw_statistics():
    cfg = RunConfig().replace(**{"objective.noise_scale": 2.0})
    n, K = 40000, 1000
    x = torch.zeros(n, 1, 2, 2)
    y = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(0))
    d = draw_randomness(x, y, K, 16, cfg.objective, cfg.align, torch.Generator().manual_seed(3))
    assert d.t.shape == (n,) and torch.all((d.t > 0) & (d.t < 1))
    logit = torch.log(d.t / (1 - d.t)).double()
    assert logit.mean().item() == pytest.approx(-0.8, abs=0.02)  # std error 0.004
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)
    assert d.noise.shape == x.shape
    assert d.noise.std().item() == pytest.approx(2.0, rel=0.02)
    assert abs(d.noise.mean().item()) < 0.02
    dropped = d.labels == K
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.006)
    assert torch.equal(d.labels[~dropped], y[~dropped])
    assert 1 - d.keep.float().mean().item() == pytest.approx(0.2, abs=0.005)


def test_draws_follow_config():
    cfg = RunConfig().replace(**{"objective.P_mean": 0.5, "objective.P_std": 0.1, "objective.label_drop_prob": 0.0,
                                 "align.mode": "repa"})
    n = 5000
    x = torch.zeros(n, 1, 1, 1)
    y = torch.zeros(n, dtype=torch.long)
    d = draw_randomness(x, y, 7, 4, cfg.objective, cfg.align, torch.Generator().manual_seed(0))
    logit = torch.log(d.t / (1 - d.t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.1, abs=0.01)
    assert torch.all(d.labels == 0)
    assert d.keep is None  # only PixelREPA masks tokens
    assert d.noise.std().item() == pytest.approx(1.0, rel=0.05)


def test_irepa_step_loss_equals_a_direct_computation():
    """iREPA (SPEC-free, from its JiT code): conv projector on the tap-block tokens, targets
    z-scored over the tokens with alpha 0.8, 1 - cos averaged, weight 0.5."""
    cfg, net, head, x, y, draws, target = setup("irepa", **{"align.weight": 0.5})
    target = target + 3.0  # a mean over the tokens, which the z-score mostly removes
    assert draws.keep is None  # no token mask outside PixelREPA
    losses = loss(cfg, net, head, x, draws, target)
    t = draws.t.view(-1, 1, 1, 1)
    z = t * x + (1 - t) * draws.noise
    x_pred, tapped = net(z, draws.t, draws.labels, tap=cfg.tap_block)
    g = cfg.model.grid_size
    grid = tapped.transpose(1, 2).reshape(len(x), -1, g, g)
    pred = F.conv2d(grid, head.conv.weight, head.conv.bias, padding=1).flatten(2).transpose(1, 2)
    mean, std = target.mean(dim=1, keepdim=True), target.std(dim=1, keepdim=True)
    normed = (target - 0.8 * mean) / (std + 1e-6)
    align = (1 - F.cosine_similarity(pred, normed, dim=-1)).mean()
    v, v_pred = velocity(x, z, draws.t, 0.05), velocity(x_pred, z, draws.t, 0.05)
    denoise = (v - v_pred).pow(2).mean()
    torch.testing.assert_close(losses["align"], align)
    torch.testing.assert_close(losses["total"], denoise + 0.5 * align)
    # The z-score is what makes it iREPA: the raw targets give another loss.
    raw = loss(cfg.replace(**{"align.target_norm": "none"}), net, head, x, draws, target)
    assert not torch.allclose(raw["align"], losses["align"])
