"""Euler / Heun sampling of the flow from noise (t = 0) to image (t = 1) with guidance (SPEC 7).

Numerically the released sampler, with two savings (both switchable, SamplerConfig): the
conditional and unconditional passes share one batched forward (`batched_guidance`), and
where the effective guidance scale is 1 (outside the interval, or cfg = 1) the
unconditional pass is skipped (`skip_unguided`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pixelrepa.config import SamplerConfig
from pixelrepa.objective import velocity

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def guidance_scale(t: float, sampler: SamplerConfig) -> float:
    """cfg inside the interval, 1 outside: t < max and (min == 0 or t > min), both strict,
    compared in float32."""
    t, lo, hi = (_as_float32(v) for v in (t, sampler.interval_min, sampler.interval_max))
    inside = t < hi and (lo == 0 or t > lo)
    return sampler.cfg_scale if inside else 1.0


def _as_float32(value: float) -> float:
    """Round to float32, since the released code compares float32 time tensors."""
    return torch.tensor(value, dtype=torch.float32).item()


class GuidedVelocity:
    """v(z, t) = v_u + s * (v_c - v_u) with v = (net(z, t, y) - z) / max(1 - t, t_eps)."""

    def __init__(self, net: Denoiser, labels: Tensor, null_class: int, sampler: SamplerConfig, t_eps: float):
        self.net, self.labels, self.sampler, self.t_eps = net, labels, sampler, t_eps
        self.null_labels = torch.full_like(labels, null_class)

    def __call__(self, z: Tensor, t: float) -> Tensor:
        n = z.shape[0]
        t_vec = torch.full((n,), t, dtype=torch.float32, device=z.device)
        scale = guidance_scale(t, self.sampler)
        if scale == 1.0 and self.sampler.skip_unguided:
            return velocity(self.net(z, t_vec, self.labels), z, t_vec, self.t_eps)
        if self.sampler.batched_guidance:
            x_both = self.net(torch.cat([z, z]), torch.cat([t_vec, t_vec]), torch.cat([self.labels, self.null_labels]))
            x_cond, x_uncond = x_both.chunk(2)
            v_cond = velocity(x_cond, z, t_vec, self.t_eps)
        else:
            # v_cond is computed before the second call: a network captured in CUDA graphs
            # ('reduce-overhead') reuses its output buffer, which would overwrite x_cond.
            v_cond = velocity(self.net(z, t_vec, self.labels), z, t_vec, self.t_eps)
            x_uncond = self.net(z, t_vec, self.null_labels)
        v_uncond = velocity(x_uncond, z, t_vec, self.t_eps)
        return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def sample(net: Denoiser, noise: Tensor, labels: Tensor, null_class: int, sampler: SamplerConfig,
           t_eps: float = 0.05, return_trajectory: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Integrate from z_0 = noise (noise_scale already applied) over linspace(0, 1, steps + 1).

    Heun for steps 0..steps-2 and a final Euler step onto t = 1, so the network is never
    evaluated at t = 1; Euler for every step with method 'euler'.
    """
    v = GuidedVelocity(net, labels, null_class, sampler, t_eps)
    grid = torch.linspace(0, 1, sampler.steps + 1, dtype=torch.float32).tolist()
    z = noise
    trajectory = [z]
    for k in range(sampler.steps):
        t, t_next = grid[k], grid[k + 1]
        dt = t_next - t
        v0 = v(z, t)
        if sampler.method == "heun" and k < sampler.steps - 1:
            v1 = v(z + dt * v0, t_next)
            z = z + dt * (0.5 * (v0 + v1))
        else:
            z = z + dt * v0
        trajectory.append(z)
    return (z, trajectory) if return_trajectory else z
