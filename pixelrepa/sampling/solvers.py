"""Solving the flow from noise (t = 0) to image (t = 1) with guidance (SPEC 7).

The ODE is JiT's: z_t = t x + (1 - t) e, and dz/dt = (x^(z, t) - z) / (1 - t) with x^ the
network's x-prediction; the released velocity clamps the denominator, max(1 - t, t_eps).

- `euler` and `heun` are numerically the released sampler (the clamped velocity; Heun steps and
  a final Euler step onto t = 1), with two savings, both switchable (SamplerConfig): the
  conditional and unconditional passes share one batched forward (`batched_guidance`), and where
  the effective guidance scale is 1 (outside the interval, or cfg = 1) the unconditional pass is
  skipped (`skip_unguided`).
- `dpm2m` and `dpm3m` are multistep solvers in data-prediction form (DPM-Solver++(2M), Lu et al.
  2022, and its third-order variant): one network evaluation per step, the ODE's linear part
  integrated exactly and x^ extrapolated from the previous steps, in t (default) or in the log-SNR
  as published (`sampler.multistep_in`; see `multistep_update`).

Guidance combines two predictions D = D_2 + s (D_1 - D_2) inside the interval: with classifier-free
guidance D_1 is conditional and D_2 unconditional; with a guide model (autoguidance, Karras et al.
2024) D_2 is the weaker guide network's conditional prediction. The time grid comes from
`pixelrepa.sampling.schedules`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from pixelrepa.config import RunConfig, SamplerConfig
from pixelrepa.objective import velocity
from pixelrepa.sampling.schedules import time_grid

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
    """v(z, t) = v_2 + s * (v_1 - v_2) with v = (D(z, t) - z) / max(1 - t, t_eps), and the guided
    prediction `denoised(z, t)` = D_2 + s * (D_1 - D_2): D_1 = net(z, t, y); D_2 = net(z, t, null) or,
    with `guide`, guide(z, t, y)."""

    def __init__(self, net: Denoiser, labels: Tensor, null_class: int, sampler: SamplerConfig, t_eps: float,
                 guide: Denoiser | None = None):
        self.net, self.labels, self.sampler, self.t_eps, self.guide = net, labels, sampler, t_eps, guide
        self.null_labels = torch.full_like(labels, null_class)

    def __call__(self, z: Tensor, t: float) -> Tensor:
        return self._guided(z, t, lambda x, t_vec: velocity(x, z, t_vec, self.t_eps))

    def denoised(self, z: Tensor, t: float) -> Tensor:
        """The guided x-prediction, in z's dtype."""
        return self._guided(z, t, lambda x, t_vec: x.to(z.dtype, copy=True))

    def scale(self, t: float) -> float:
        return guidance_scale(t, self.sampler)

    def _guided(self, z: Tensor, t: float, f: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """f_2 + s * (f_1 - f_2) with f_i = f(D_i, t); only f(D_1) where the scale is 1 and the pass is skipped."""
        n = z.shape[0]
        t_vec = torch.full((n,), t, dtype=torch.float32, device=z.device)
        scale = self.scale(t)
        if scale == 1.0 and self.sampler.skip_unguided:
            return f(self.net(z, t_vec, self.labels), t_vec)
        if self.guide is None and self.sampler.batched_guidance:
            x_both = self.net(torch.cat([z, z]), torch.cat([t_vec, t_vec]), torch.cat([self.labels, self.null_labels]))
            x_cond, x_uncond = x_both.chunk(2)
            f_cond = f(x_cond, t_vec)
        else:
            # f_cond is computed before the second call: a network captured in CUDA graphs
            # ('reduce-overhead') reuses its output buffer, which would overwrite x_cond.
            f_cond = f(self.net(z, t_vec, self.labels), t_vec)
            x_uncond = self.net(z, t_vec, self.null_labels) if self.guide is None else self.guide(z, t_vec, self.labels)
        f_uncond = f(x_uncond, t_vec)
        return f_uncond + scale * (f_cond - f_uncond)


# ---------------------------------------------------------------------------
# The solvers: each yields z after every step of `grid`
# ---------------------------------------------------------------------------

def euler_steps(v: GuidedVelocity, z: Tensor, grid: list[float]) -> Iterator[Tensor]:
    """z <- z + (t' - t) v(z, t)."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        z = z + dt * v(z, t)
        yield z


def heun_steps(v: GuidedVelocity, z: Tensor, grid: list[float]) -> Iterator[Tensor]:
    """Heun (the trapezoid of v at both ends of an Euler step), but Euler onto t = 1, so that the
    network is never evaluated at t = 1."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        v0 = v(z, t)
        if t_next < 1.0:
            v1 = v(z + dt * v0, t_next)
            z = z + dt * (0.5 * (v0 + v1))
        else:
            z = z + dt * v0
        yield z


def log_snr(t: float) -> float:
    """lambda = log(alpha / sigma) = log(t / (1 - t)) for 0 < t < 1."""
    return math.log(t / (1 - t))


def multistep_update(z: Tensor, t: float, t_next: float, history: list[tuple[float, Tensor]],
                     variable: str = "t") -> Tensor:
    """One step from t to t_next < 1 of the x-prediction ODE, given [(t_j, x^_j)], newest last and at t;
    x^ is extrapolated by the polynomial through the history (order len(history), at most 3) in
    `variable`, t or the log-SNR lambda (where points at t = 0, lambda = -inf, are left out).

    With alpha = t, sigma = 1 - t and lambda = log(alpha / sigma), dz/dt = (x^ - z) / sigma has the
    integrating factor 1 / sigma: d(z / sigma)/dt = x^ / sigma^2, and d(z / sigma)/d lambda = e^lambda x^
    (d lambda/dt = 1 / (alpha sigma)). So, exactly,

        z' = (sigma' / sigma) z + sigma' int_t^t' x^(u) / (1 - u)^2 du = (sigma'/sigma) z + sigma' int e^lambda x^ dlambda,

    and only x^ is approximated, in Newton form in s (= t or lambda) through s_0 = s(t), s_1, s_2:
    x^ = x_0 + d1 (s - s_0) + d2 (s - s_0)(s - s_1), d1 = (x_0 - x_1) / (s_0 - s_1),
    d2 = (d1 - (x_1 - x_2) / (s_1 - s_2)) / (s_0 - s_2). Then z' = z + (t' - t) / (1 - t) (x_0 - z)
    + w1 d1 + w2 d2: x^ held constant gives the first part, the Euler step of the unclamped velocity
    (DDIM; finite at t = 0). The weights are the integrals of the Newton terms:

    - in lambda (DPM-Solver++(2M), its 3M), h = lambda' - lambda, h1 = lambda - lambda_1, int_0^h e^s s^k
      ds = e^h I_k: w1 = alpha' I_1, w2 = alpha' (I_2 + h1 I_1), I_1 = h - 1 + e^-h,
      I_2 = h^2 - 2h + 2 - 2 e^-h;
    - in t, with sigma_1 = 1 - t_1 and L = log(sigma / sigma'): w1 = sigma - sigma' - sigma' L,
      w2 = sigma sigma_1 (1 - sigma'/sigma) - sigma' (sigma + sigma_1) L + sigma' (sigma - sigma').
    """
    x0 = history[-1][1]
    z_next = z + (t_next - t) / (1 - t) * (x0 - z)
    points = history if variable == "t" else [(log_snr(tj), xj) for tj, xj in history if tj > 0]
    if len(points) < 2:
        return z_next
    (s0, _), (s1, x1) = points[-1], points[-2]
    d1 = (x0 - x1) / (s0 - s1)
    sigma, sigma_next, sigma1 = 1 - t, 1 - t_next, 1 - history[-2][0]
    if variable == "t":
        log_ratio = math.log(sigma / sigma_next)
        w1 = sigma - sigma_next - sigma_next * log_ratio
        w2 = sigma * sigma1 * (1 - sigma_next / sigma) - sigma_next * (sigma + sigma1) * log_ratio \
            + sigma_next * (sigma - sigma_next)
    else:
        h, h1 = log_snr(t_next) - s0, s0 - s1
        i1, i2 = h + math.expm1(-h), h * h - 2 * h - 2 * math.expm1(-h)
        w1, w2 = t_next * i1, t_next * (i2 + h1 * i1)
    if len(points) == 2:
        return z_next + w1 * d1
    s2, x2 = points[-3]
    d2 = (d1 - (x1 - x2) / (s1 - s2)) / (s0 - s2)
    return z_next + w1 * d1 + w2 * d2


def multistep_steps(v: GuidedVelocity, z: Tensor, grid: list[float], order: int, t_eps: float,
                    variable: str = "t") -> Iterator[Tensor]:
    """`multistep_update` of order up to `order`, one evaluation per step.

    The history holds the guided x^ since the guidance scale last changed (entering the CFG interval,
    where x^ jumps), so the first step, and the first in the interval, are first order, the next at
    most second. The step onto t = 1 (lambda = +inf) is the released sampler's final Euler step,
    z + (1 - t) (x^ - z) / max(1 - t, t_eps): exactly z = x^ when 1 - t >= t_eps, and the released
    partial step otherwise. The network is never evaluated at t = 1.
    """
    history: list[tuple[float, Tensor]] = []
    scale = None
    for t, t_next in zip(grid[:-1], grid[1:]):
        x_hat = v.denoised(z, t)
        if v.scale(t) != scale:
            history, scale = [], v.scale(t)
        history = (history + [(t, x_hat)])[-order:]
        if t_next >= 1.0:
            z = z + (1 - t) / max(1 - t, t_eps) * (x_hat - z)
        else:
            z = multistep_update(z, t, t_next, history, variable)
        yield z


@torch.no_grad()
def sample(net: Denoiser, noise: Tensor, labels: Tensor, null_class: int, sampler: SamplerConfig,
           t_eps: float = 0.05, return_trajectory: bool = False,
           guide: Denoiser | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Integrate from z_0 = noise (noise_scale already applied) over the grid of `sampler.schedule`
    (uniform: linspace(0, 1, steps + 1)) with `sampler.method`; `guide` (a weaker network of the
    same data) replaces the unconditional pass inside the guidance interval (autoguidance).

    Heun makes 2 * steps - 1 network evaluations per guided pair, the others `steps`.
    """
    v = GuidedVelocity(net, labels, null_class, sampler, t_eps, guide)
    grid = time_grid(sampler)
    if sampler.method == "heun":
        steps = heun_steps(v, noise, grid)
    elif sampler.method == "euler":
        steps = euler_steps(v, noise, grid)
    else:
        steps = multistep_steps(v, noise, grid, {"dpm2m": 2, "dpm3m": 3}[sampler.method], t_eps,
                                sampler.multistep_in)
    z = noise
    trajectory = [z]
    for z in steps:
        trajectory.append(z)
    return (z, trajectory) if return_trajectory else z


def check_guide(config: RunConfig, guide: RunConfig) -> None:
    """Refuse a guide model that does not denoise the same images: image size, channels, patch grid,
    classes and noise scale must match the sampled model's (one line naming each mismatch)."""
    m, g = config.model, guide.model
    checks = (("image size", m.input_size, g.input_size), ("channels", m.in_channels, g.in_channels),
              ("patch grid", f"{m.input_size // m.patch_size}x{m.input_size // m.patch_size}",
               f"{g.input_size // g.patch_size}x{g.input_size // g.patch_size}"),
              ("classes", m.num_classes, g.num_classes),
              ("noise scale", config.objective.noise_scale, guide.objective.noise_scale))
    wrong = [f"{name} {mine} vs the guide's {theirs}" for name, mine, theirs in checks if mine != theirs]
    if wrong:
        raise ValueError(f"the guide model does not fit the model: {'; '.join(wrong)}; guide with a weaker model of "
                         "the same data (an earlier checkpoint, or a smaller preset of the same size and classes)")
