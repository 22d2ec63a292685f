"""Time grids of the sampler: steps + 1 increasing times from 0 (noise) to 1 (image), float32 values.

`uniform` is the released grid, linspace(0, 1, steps + 1) in float32. The other two place the same
number of steps differently. With z_t = t x + (1 - t) e the log-SNR is lambda = log(t / (1 - t))
and the EDM noise level sigma = (1 - t) / t = exp(-lambda):

- `shifted` (Esser et al. 2024, SD3's time shift): t' = t / (t + s (1 - t)) on the uniform t, i.e.
  lambda' = lambda - log s. shift s > 1 moves every step towards the noise (denser near t = 0),
  s < 1 towards the data (denser near t = 1); s = 1 is the uniform grid.
- `edm` (Karras et al. 2022, eq. 5): sigma_k = (sigma_max^(1/rho) + k / (N - 1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho for k = 0 .. N - 1, then sigma = 0 (t = 1). Sampling starts at t = 0 (pure
  noise, as released) instead of sigma_max, which only sets the spacing of the first step.
"""

from __future__ import annotations

import torch

from pixelrepa.config import SamplerConfig


def time_grid(sampler: SamplerConfig) -> list[float]:
    """The grid `sampler.schedule` names, with `sampler.steps` steps."""
    if sampler.schedule == "uniform":
        return uniform_grid(sampler.steps)
    if sampler.schedule == "shifted":
        grid = shifted_grid(sampler.steps, sampler.shift)
    else:
        grid = edm_grid(sampler.steps, sampler.rho, sampler.sigma_min, sampler.sigma_max)
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"the '{sampler.schedule}' grid of {sampler.steps} steps has repeated times in float32: "
                         "use fewer steps or a milder shift / sigma range")
    return grid


def uniform_grid(steps: int) -> list[float]:
    """linspace(0, 1, steps + 1) in float32, as released."""
    return torch.linspace(0, 1, steps + 1, dtype=torch.float32).tolist()


def shifted_grid(steps: int, shift: float) -> list[float]:
    """The uniform grid through t -> t / (t + shift (1 - t)) (log-SNR lowered by log shift)."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return _float32(t / (t + shift * (1 - t)))


def edm_grid(steps: int, rho: float, sigma_min: float, sigma_max: float) -> list[float]:
    """EDM's rho-spaced sigmas mapped to t = 1 / (1 + sigma), starting at t = 0 and ending at t = 1."""
    if steps == 1:
        return [0.0, 1.0]
    k = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    sigma = (sigma_max ** (1 / rho) + k * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = 1 / (1 + sigma)
    t[0] = 0.0
    return _float32(torch.cat([t, torch.ones(1, dtype=torch.float64)]))


def _float32(t: torch.Tensor) -> list[float]:
    """Times rounded to float32, the dtype the network and the released interval test see."""
    return t.to(torch.float32).tolist()
