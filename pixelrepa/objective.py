"""The training objective (SPEC 4, 5): x-prediction with a velocity loss, plus alignment.

`draw_randomness` makes every random choice of a step; `training_loss` is then a
deterministic function of (networks, batch, draws), so tests and the parity fixtures
can hand the draws in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pixelrepa.align.heads import (
    MaskedTransformerAdapter,
    apply_token_mask,
    cosine_alignment_loss,
    draw_keep_mask,
    normalize_targets,
)
from pixelrepa.config import AlignConfig, ObjectiveConfig
from pixelrepa.models.jit import JiT


@dataclass
class Draws:
    """Every random draw of one training step."""

    t: Tensor
    """(N,) signal level, t = 1 clean, t = 0 noise."""
    noise: Tensor
    """(N, C, H, W) e, noise_scale already applied."""
    labels: Tensor
    """(N,) labels after dropping to the null class."""
    keep: Tensor | None = None
    """(N, T) bool token mask for PixelREPA (True = keep)."""


def draw_randomness(x: Tensor, y: Tensor, num_classes: int, num_tokens: int, objective: ObjectiveConfig,
                    align: AlignConfig, generator: torch.Generator | None = None) -> Draws:
    """t = sigmoid(N(P_mean, P_std)), e = noise_scale * N(0, I), labels -> K w.p. label_drop_prob."""
    n, device = x.shape[0], x.device
    normal = torch.randn(n, generator=generator, device=device)
    t = torch.sigmoid(normal * objective.P_std + objective.P_mean)
    noise = torch.randn(x.shape, generator=generator, device=device) * objective.noise_scale
    drop = torch.rand(n, generator=generator, device=device) < objective.label_drop_prob
    labels = torch.where(drop, torch.full_like(y, num_classes), y)
    keep = None
    if align.mode == "pixelrepa":
        keep = draw_keep_mask(n, num_tokens, align.mask_ratio, generator, device)
    return Draws(t=t, noise=noise, labels=labels, keep=keep)


def velocity(x_pred: Tensor, z: Tensor, t: Tensor, t_eps: float) -> Tensor:
    """v = (x_pred - z) / max(1 - t, t_eps); t is (N,) and broadcast."""
    t = t.view(-1, *([1] * (z.dim() - 1)))
    return (x_pred - z) / (1 - t).clamp_min(t_eps)


def training_loss(net: JiT, head: nn.Module | None, x: Tensor, draws: Draws, objective: ObjectiveConfig,
                  align: AlignConfig, tap_block: int, target: Tensor | None = None) -> dict[str, Tensor]:
    """Named loss terms: 'denoise', 'align' (if a head), and 'total' = denoise + weight * align.

    x: clean images in [-1, 1]; target: (N, T, C) raw encoder features of x (SPEC 5), normalised
    here as `align.target_norm` asks.
    """
    t = draws.t.view(-1, 1, 1, 1)
    z = t * x + (1 - t) * draws.noise
    v = velocity(x, z, draws.t, objective.t_eps)
    if head is None:
        x_pred = net(z, draws.t, draws.labels)
        tapped = None
    else:
        x_pred, tapped = net(z, draws.t, draws.labels, tap=tap_block)
    v_pred = velocity(x_pred, z, draws.t, objective.t_eps)
    denoise = (v - v_pred).float().pow(2).mean()
    losses = {"denoise": denoise}
    if head is not None:
        if target is None:
            raise ValueError(f"alignment mode '{align.mode}' needs encoder targets")
        pred = head_prediction(net, head, tapped, draws.keep, draws.t, draws.labels)
        losses["align"] = cosine_alignment_loss(pred, normalize_targets(target, align))
        losses["total"] = denoise + align.weight * losses["align"]
    else:
        losses["total"] = denoise
    return losses


def head_prediction(net: JiT, head: nn.Module, tapped: Tensor, keep: Tensor | None, t: Tensor,
                    labels: Tensor) -> Tensor:
    """The head's (N, T, C) prediction of the encoder features from the tapped tokens (SPEC 5): the
    adapter sees them with the tokens outside `keep` replaced by the backbone's mask token, the
    projector sees them as they are."""
    if isinstance(head, MaskedTransformerAdapter):
        if keep is None:
            raise ValueError("PixelREPA needs a token keep-mask in the draws")
        return head(apply_token_mask(tapped, keep, net.mask_token), t, labels)
    return head(tapped)
